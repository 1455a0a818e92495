"""``transcriptformer score``: log-likelihood of every cell and gene under the model, and likelihood outliers for QC.

The flags of a run are those of ``transcriptformer inference`` (:func:`~transcriptformer.cli.common.add_run_arguments`),
with the score outputs as the default ``--output-keys``; ``--outlier-threshold`` sets the QC rule.
"""

from __future__ import annotations

import argparse

from transcriptformer.cli.common import add_run_arguments, positive_number, run_config_from_args, run_task
from transcriptformer.tasks.score import ScoreConfig

EXAMPLES = """\
examples:
  # the bundled held-out cells under the bundled demo model: scores, per-gene layers, outlier flags
  transcriptformer score --checkpoint-path models/demo-mouse-brain \\
      --data-file test/data/demo_mouse_brain_heldout.h5ad --output-path score_results

  # per-cell scores only, a stricter outlier rule
  transcriptformer score --checkpoint-path CKPT --data-file cells.h5ad \\
      --output-keys log_likelihood mean_log_likelihood --outlier-threshold 5

documentation: docs/score.md
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``score``; their defaults are :class:`ScoreConfig`'s and an inference run's."""
    score = ScoreConfig()
    parser.description = (
        "Score the cells of one or more files (.h5ad, .zarr, 10x .h5) under a TranscriptFormer checkpoint: "
        "log-likelihoods of gene identities and counts per cell and per gene, and cells whose likelihood is an "
        "outlier among the file's cells; written to one .h5ad file."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    io, _, _ = add_run_arguments(parser, score.run_defaults())
    io.add_argument(
        "--outlier-threshold",
        type=positive_number,
        default=score.outlier_threshold,
        metavar="Z",
        help="flag cells whose robust z-score of mean_log_likelihood (median and 1.4826 x MAD of the cells scored) "
        "is below -Z (default: %(default)s)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``transcriptformer score``; returns the exit code."""
    from transcriptformer.tasks.score import ScoreTask

    task = ScoreTask(settings=ScoreConfig(args.outlier_threshold))
    run_task(task, run_config_from_args(args), dry_run=args.dry_run)
    return 0
