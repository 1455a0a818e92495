"""What the subcommands share: error reporting and the flags that several of them take."""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import TYPE_CHECKING

from transcriptformer.config import INVALID_COUNTS, DataConfig

if TYPE_CHECKING:
    from transcriptformer.training.objective import LossTerms

# --use-raw: which count matrix to read.
USE_RAW = {"auto": None, "true": True, "false": False}


def report_user_error(command: str, error: BaseException, parser: argparse.ArgumentParser | None = None) -> int:
    """Print ``transcriptformer COMMAND: error: MESSAGE`` on one line and return the exit code 1.

    With the command's ``parser``, settings that the message names by their Python name (``num_gpus``) are named by
    their flag (``--num-gpus``), since a flag and its setting share one name.
    """
    message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    if parser is not None and "override" not in message:  # an override error names the override's keys
        message = with_flag_names(message, parser)
    print(f"transcriptformer {command}: error: {message}", file=sys.stderr)
    return 1


def with_flag_names(message: str, parser: argparse.ArgumentParser) -> str:
    """``message`` with each flag's setting name (one with an underscore, as a whole word) replaced by the flag.

    A dotted override key (``model.inference_config.batch_size=0``) is left as it is.
    """
    for action in parser._actions:
        flag = next((option for option in action.option_strings if option.startswith("--")), None)
        if flag and "_" in action.dest:
            message = re.sub(rf"(?<![\w./-]){re.escape(action.dest)}(?![\w=./-])", flag, message)
    return message


def positive_int(text: str) -> int:
    """A whole number of at least 1 (attempts, workers): an argparse ``type``."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number of at least 0 (worker processes, 0: none): an argparse ``type``."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number above 0 (seconds, factors): an argparse ``type``."""
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def add_use_raw_argument(group: argparse._ActionsContainer) -> None:
    """``--use-raw auto|true|false`` in any case, as the original's ``True``/``False``.

    The namespace holds the lower-case string; :data:`USE_RAW` maps it.
    """
    group.add_argument(
        "--use-raw",
        type=str.lower,
        choices=list(USE_RAW),
        default="auto",
        help="counts from adata.raw.X (true), adata.X (false), or raw when present (auto); any case "
        "(default: %(default)s)",
    )


def add_invalid_counts_argument(group: argparse._ActionsContainer) -> None:
    """``--invalid-counts error|drop|clip``: what to do with NaN, infinite or negative counts."""
    group.add_argument(
        "--invalid-counts",
        choices=INVALID_COUNTS,
        default=DataConfig.invalid_counts,
        help="counts that are NaN, infinite or negative: error stops naming them, drop leaves out their cells, "
        "clip sets them to 0 (infinite ones to --clip-counts) (default: %(default)s)",
    )


def positive_number(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def add_overwrite_argument(group: argparse._ActionsContainer, what: str) -> None:
    """``--overwrite``: replace ``what`` at the output path."""
    group.add_argument("--overwrite", action="store_true", help=f"replace {what} already at the output path")


def print_dry_run(terms: LossTerms) -> None:
    """Report a successful training dry run (one forward and backward pass)."""
    print(f"one batch: {terms.summary()}; forward and backward passed")
    print("Dry-run complete")
