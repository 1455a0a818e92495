"""How much a command tells its user: ``--quiet``, the default, or ``--verbose``.

=========  ================================================================================================
quiet      errors, warnings and the command's result (its last line, ``Output: <path>``); no progress
           messages, no progress bars
default    also progress messages and bars; informational logs of other libraries (Lightning's
           ``GPU available: ...`` lines and advertisements) and their deprecation warnings are hidden
verbose    also every log at INFO level (other libraries' and this package's) and every warning
=========  ================================================================================================

The level is held in the environment variable ``TRANSCRIPTFORMER_VERBOSITY`` while :func:`verbosity` is active,
so that the processes a run starts (inference on several GPUs, DDP training) follow it. Like the other modules of
layer 0, this one imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

if TYPE_CHECKING:
    from tqdm.auto import tqdm

Verbosity = Literal["quiet", "normal", "verbose"]
VERBOSITIES: tuple[Verbosity, ...] = ("quiet", "normal", "verbose")
VERBOSITY_ENV = "TRANSCRIPTFORMER_VERBOSITY"

# The loggers of Lightning's informational lines: "GPU available: ...", "💡 Tip: ...", "`Trainer.fit` stopped: ..."
# (rank_zero_info writes to the first two), "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: ...", "Initializing distributed:
# ...", "Seed set to 0". Lightning sets the level of its package loggers when it is imported, so the level of these
# is set instead (https://lightning.ai/docs/pytorch/latest/common/console_logs.html).
LIGHTNING_INFO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric.utilities.distributed",
    "lightning.fabric.utilities.seed",
)
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# Deprecations that libraries announce as plain UserWarnings, e.g. torch's "'set_vital' is deprecated".
DEPRECATION_MESSAGE = r"(?i).*\bdeprecated\b"
PACKAGE_DIR = Path(__file__).resolve().parent


def current_verbosity() -> Verbosity:
    """The verbosity in effect: that of the innermost :func:`verbosity`, inherited by child processes.

    Raises
    ------
    ValueError
        When ``$TRANSCRIPTFORMER_VERBOSITY`` holds something else than quiet, normal or verbose.
    """
    value = os.environ.get(VERBOSITY_ENV, "normal")
    if value not in VERBOSITIES:
        raise ValueError(f"{VERBOSITY_ENV}={value!r}: use one of {', '.join(VERBOSITIES)}")
    return value


def say(message: str) -> None:
    """Print a progress message to stdout, unless quiet (a command's result is printed with ``print``)."""
    if current_verbosity() != "quiet":
        print(worded(message), flush=True)


def print_output(path: str | Path) -> None:
    """Print ``Output: <path>``, the last line of every command that writes something (also under quiet).

    A local path is printed absolute; a URI (``s3://...``) as it is.
    """
    shown = path if "://" in str(path) else Path(path).resolve()
    print(f"Output: {shown}", flush=True)


def current_wording() -> Callable[[str], str]:
    """How this package's messages are worded now (see :func:`verbosity`): to hand to the processes of a run."""
    return _wording


def worded(message: str) -> str:
    """``message`` in the words of the user's interface: a command's flags for the settings it names."""
    return _wording(message)


def _same_words(message: str) -> str:
    return message


# How this package's messages are worded for the user: a command names settings by their flags (verbosity()).
_wording: Callable[[str], str] = _same_words
# Who speaks: the running command (``transcriptformer inference``), in warnings and progress bars (verbosity()).
_name = "transcriptformer"


def show_progress() -> bool:
    """Whether progress bars are shown (not when quiet)."""
    return current_verbosity() != "quiet"


def progress_bar(*args: Any, desc: str | None = None, disable: bool | None = False, **kwargs: Any) -> tqdm:
    """A ``tqdm.auto`` progress bar, hidden when quiet; the arguments are tqdm's.

    Its label names the running command (``transcriptformer inference: embed``; see :func:`verbosity`), then ``desc``.
    """
    from tqdm.auto import tqdm

    label = f"{_name}: {desc}" if desc else _name
    return tqdm(*args, desc=label, disable=disable if show_progress() else True, **kwargs)


@contextlib.contextmanager
def verbosity(
    level: Verbosity | None = None, name: str | None = None, wording: Callable[[str], str] | None = None
) -> Iterator[None]:
    """Within the block, messages, logs and warnings follow ``level``; everything is restored after it.

    Parameters
    ----------
    level
        quiet, normal or verbose (see the module's description); ``None``: the inherited one.
    name
        Prefix of this package's warnings, which are printed on one line: ``NAME: warning: MESSAGE``, and the label
        of its progress bars; ``None``: the inherited one (``transcriptformer`` outside any block).
    wording
        Rewords this package's messages (:func:`say`) and warnings for the user: the command line names the
        settings that library code names as parameters by their flags.
    """
    global _wording, _name
    level = level or current_verbosity()
    with contextlib.ExitStack() as restore, warnings.catch_warnings():
        restore.callback(_set_environ, os.environ.get(VERBOSITY_ENV))
        os.environ[VERBOSITY_ENV] = level
        restore.callback(setattr, sys.modules[__name__], "_wording", _wording)
        restore.callback(setattr, sys.modules[__name__], "_name", _name)
        _wording, _name = wording or _wording, name or _name
        warnings.showwarning = _one_line_for_package(_name, warnings.showwarning)
        if level == "verbose":
            warnings.simplefilter("default")
            restore.enter_context(_root_log_handler(logging.INFO))
        else:
            for category in DEPRECATIONS:
                warnings.filterwarnings("ignore", category=category)
            warnings.filterwarnings("ignore", message=DEPRECATION_MESSAGE)
            for logger_name in LIGHTNING_INFO_LOGGERS:
                restore.enter_context(_log_level(logging.getLogger(logger_name), logging.WARNING))
        yield


def _set_environ(value: str | None) -> None:
    if value is None:
        os.environ.pop(VERBOSITY_ENV, None)
    else:
        os.environ[VERBOSITY_ENV] = value


@contextlib.contextmanager
def _log_level(logger: logging.Logger, level: int) -> Iterator[None]:
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextlib.contextmanager
def _root_log_handler(level: int) -> Iterator[None]:
    """Every logger's records at ``level`` and above on stderr; Lightning's, which it prints itself, excepted."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
    handler.setLevel(level)
    handler.addFilter(lambda record: record.name.partition(".")[0] != "lightning")
    root.addHandler(handler)
    try:
        with _log_level(root, level):
            yield
    finally:
        root.removeHandler(handler)


def _one_line_for_package(name: str, show_other: Any) -> Any:
    """A ``warnings.showwarning`` that prints this package's warnings as ``NAME: warning: MESSAGE``."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
            print(f"{name}: warning: {_wording(str(message))}", file=file or sys.stderr, flush=True)
        else:
            show_other(message, category, filename, lineno, file, line)

    return show
