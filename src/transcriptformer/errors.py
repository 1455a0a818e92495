"""The error a user can fix: reported by the command line in one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input, settings or environment, with a message that says how to fix it."""


def first_few(names: list[str], limit: int = 8) -> str:
    """``names`` joined by commas for a message; past ``limit``, the first ones and how many more there are."""
    shown = ", ".join(map(str, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
