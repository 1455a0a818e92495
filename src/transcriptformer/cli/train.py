"""``transcriptformer train``: pretrain a model from scratch, configured by Hydra YAML with overrides.

::

    transcriptformer train --config conf/demo.yaml trainer.max_epochs=5 optim.lr=1e-3

writes a checkpoint directory in the published layout to ``output_path`` (``--overwrite`` replaces one already
there).
"""

from __future__ import annotations

import argparse

from transcriptformer.cli.common import add_overwrite_argument, print_dry_run
from transcriptformer.console import print_output


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``train``."""
    parser.description = (
        "Train a new TranscriptFormer from .h5ad files and gene-embedding files. Settings come from a "
        "Hydra YAML file (see conf/) and KEY=VALUE overrides; the result is a checkpoint directory that "
        "'transcriptformer inference' loads."
    )
    parser.add_argument(
        "--config", default=None, metavar="YAML", help="config file, e.g. conf/demo.yaml (default: built-in defaults)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Hydra overrides, e.g. optim.lr=1e-3 trainer.device=cpu data.train_files=[a.h5ad,b.h5ad]",
    )
    add_overwrite_argument(parser, "a checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build model and data, run one forward and backward pass, print 'Dry-run complete'; writes nothing",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compose the config, then train (or print it, or dry-run); the config is checked before torch loads."""
    from omegaconf import OmegaConf

    from transcriptformer.training.config import compose_train_config, require_training_files

    config = compose_train_config(args.config, args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(OmegaConf.structured(config)), end="")
        return 0
    require_training_files(config.data)
    from transcriptformer.training.run import run_pretraining

    result = run_pretraining(config, dry_run_only=args.dry_run, overwrite=args.overwrite)
    if args.dry_run:
        print_dry_run(result)
    else:
        from lightning.pytorch.utilities import rank_zero_only  # imported by the run already

        if rank_zero_only.rank == 0:  # under DDP, every process returns here
            print_output(result)
    return 0
