"""``transcriptformer merge-adapters``: fold LoRA adapters into their base checkpoint, as a new checkpoint."""

from __future__ import annotations

import argparse

from transcriptformer.cli.common import CHECKPOINT_HELP, add_overwrite_argument, checkpoint_folder
from transcriptformer.console import print_output


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``merge-adapters``."""
    parser.description = (
        "Write a full checkpoint directory (published layout) whose weights are the base checkpoint's "
        "with the adapters folded in; it gives the same outputs as the base model with the adapters applied."
    )
    parser.add_argument(
        "--checkpoint-path", required=True, help=f"base checkpoint the adapters were trained on: {CHECKPOINT_HELP}"
    )
    parser.add_argument("--adapter", required=True, metavar="PATH", help="adapter directory from 'finetune'")
    parser.add_argument("--output-path", required=True, help="checkpoint directory to write")
    add_overwrite_argument(parser, "a checkpoint")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Merge and save."""
    from transcriptformer.training.run import merge_adapters_into_checkpoint

    path = merge_adapters_into_checkpoint(
        checkpoint_folder(args.checkpoint_path), args.adapter, args.output_path, args.overwrite
    )
    print_output(path)
    return 0
