"""The error a user can fix: reported by the command line in one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input, settings or environment, with a message that says how to fix it."""
