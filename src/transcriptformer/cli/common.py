"""What the subcommands share: error reporting and the flags that several of them take."""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING

from transcriptformer.config import INVALID_COUNTS, DataConfig

if TYPE_CHECKING:
    from transcriptformer.training.objective import LossTerms

# --use-raw: which count matrix to read.
USE_RAW = {"auto": None, "true": True, "false": False}


def report_user_error(command: str, error: BaseException) -> int:
    """Print ``transcriptformer COMMAND: error: MESSAGE`` on one line and return the exit code 1."""
    message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    print(f"transcriptformer {command}: error: {message}", file=sys.stderr)
    return 1


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
