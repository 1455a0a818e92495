"""``transcriptformer screen``: every expressed gene of each cell knocked out or over-expressed, genes ranked.

The flags of a run are those of ``transcriptformer inference`` (:func:`~transcriptformer.cli.common.add_run_arguments`:
``--obs-filter``, resume, several processes), with the screen's of :class:`~transcriptformer.tasks.screen.ScreenConfig`.
"""

from __future__ import annotations

import argparse

from transcriptformer.cli.common import (
    add_run_arguments,
    non_negative_int,
    positive_int,
    run_config_from_args,
    run_task,
)
from transcriptformer.tasks.screen import ScreenConfig

EXAMPLES = """\
examples:
  # knock out every expressed gene of the bundled held-out astrocytes, 20 genes a cell at most
  transcriptformer screen --checkpoint-path models/demo-mouse-brain \\
      --data-file test/data/demo_mouse_brain_heldout.h5ad --knock-out all \\
      --obs-filter "cell_type == 'astrocyte'" --max-genes-per-cell 20

  # which knock-outs move oligodendrocytes toward astrocytes
  transcriptformer screen --checkpoint-path CKPT --data-file cells.h5ad --knock-out all \\
      --start-state cell_type=oligodendrocyte --goal-state cell_type=astrocyte

documentation: docs/perturb.md
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``screen``; their defaults are :class:`ScreenConfig`'s and an inference run's."""
    screen = ScreenConfig()
    parser.description = (
        "Knock out (or over-express) every expressed gene of each cell, one at a time, and rank the genes by how "
        "far they move the cells' embeddings (or toward a goal state), against a null of genes with a similar "
        "count in the same cells. Writes screen.h5ad (a row per cell and gene), screen_genes.csv and "
        "screen_pairs.parquet to --output-path."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_run_arguments(parser, screen.run_defaults(), rows_are_cells=False)
    group = parser.add_argument_group("the screen")
    kind = group.add_mutually_exclusive_group(required=True)
    kind.add_argument("--knock-out", choices=["all"], help="knock out every screened gene, one at a time")
    kind.add_argument("--over-express", choices=["all"], help="set every screened gene to the cell's highest count")
    group.add_argument(
        "--genes-file",
        default=screen.genes_file,
        metavar="FILE",
        help="screen only these genes (one a line, ids or symbols)",
    )
    group.add_argument(
        "--max-genes-per-cell",
        type=non_negative_int,
        default=screen.max_genes_per_cell,
        metavar="N",
        help="the cell's N most expressed genes; 0: all (default: %(default)s)",
    )
    group.add_argument(
        "--start-state", default=screen.start_state, metavar="KEY=VALUE", help="obs value of the cells to screen"
    )
    group.add_argument(
        "--goal-state", default=screen.goal_state, metavar="KEY=VALUE", help="obs value of the goal state's cells"
    )
    group.add_argument(
        "--prefix-reuse",
        action=argparse.BooleanOptionalAction,
        default=screen.prefix_reuse,
        help="reuse each cell's key/value prefix; --no-prefix-reuse runs every variant in full (default: %(default)s)",
    )
    group.add_argument(
        "--null-bins", type=positive_int, default=screen.null_bins, help="count bins of the null (default: %(default)s)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``transcriptformer screen``; returns the exit code."""
    from transcriptformer.tasks.screen import ScreenTask

    settings = ScreenConfig(
        kind="knock_out" if args.knock_out else "over_express",
        genes_file=args.genes_file,
        max_genes_per_cell=args.max_genes_per_cell,
        start_state=args.start_state,
        goal_state=args.goal_state,
        prefix_reuse=args.prefix_reuse,
        null_bins=args.null_bins,
    )
    run_task(ScreenTask(settings=settings), run_config_from_args(args), dry_run=args.dry_run)
    return 0
