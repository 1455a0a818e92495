"""The ``transcriptformer`` command line: one module per subcommand, each with ``register(subparsers)``.

A subcommand module defines ``register(subparsers: argparse._SubParsersAction) -> None``, which adds its parser
and sets ``func`` (called with the parsed namespace, returning an exit code) through ``set_defaults``.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from transcriptformer import __version__

# Modules under transcriptformer.cli, in the order their subcommands are listed in --help.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "inference",
    "train",
    "finetune",
    "merge_adapters",
    "download",
    "download_data",
    "doctor",
    "build_vocab",
)


def build_parser() -> argparse.ArgumentParser:
    """The root parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="transcriptformer",
        description="TranscriptFormer: embed and score single cells, fine-tune and train, on CPU or GPU.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"transcriptformer.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``transcriptformer`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
