"""``transcriptformer perturb``: in-silico knock-outs and over-expressions of genes in the cells of files.

The flags of a run are those of ``transcriptformer inference``
(:func:`~transcriptformer.cli.common.add_run_arguments`: resume, several processes), with the perturbations of
:class:`~transcriptformer.tasks.perturb.PerturbConfig`.
"""

from __future__ import annotations

import argparse

from transcriptformer.cli.common import add_run_arguments, non_negative_int, run_config_from_args, run_task
from transcriptformer.tasks.perturb import PerturbConfig

EXAMPLES = """\
examples:
  # knock Pou3f3 out of every cell, over-express Gad2 at 20 counts, with the bundled demo model
  transcriptformer perturb --checkpoint-path models/demo-mouse-brain \\
      --data-file test/data/demo_mouse_brain_heldout.h5ad --knock-out Pou3f3 --over-express Gad2=20

  # several perturbations, one of two genes together; genes by Ensembl id or symbol
  transcriptformer perturb --checkpoint-path CKPT --data-file cells.h5ad \\
      --knock-out ENSMUSG00000045515 Nfix Pou3f3+Nfix --over-express Gad2

documentation: docs/perturb.md
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``perturb``; their defaults are :class:`PerturbConfig`'s and an inference run's."""
    perturb = PerturbConfig()
    parser.description = (
        "Knock genes out of every cell of one or more files, or over-express them, and measure the shift of the "
        "cell embedding, the change of the log-likelihood and of every other gene's predicted expression. Writes "
        "summary.csv, genes.csv and perturbations.h5ad to --output-path."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_run_arguments(parser, perturb.run_defaults(), rows_are_cells=False)
    perturbations = parser.add_argument_group("perturbations (genes by Ensembl id or symbol; '+' joins genes)")
    perturbations.add_argument(
        "--knock-out",
        nargs="+",
        action="extend",
        default=list(perturb.knock_out),
        metavar="GENE",
        help="remove the gene from every cell, one perturbation per GENE (GENE+GENE: several at once)",
    )
    perturbations.add_argument(
        "--over-express",
        nargs="+",
        action="extend",
        default=list(perturb.over_express),
        metavar="GENE[=COUNT]",
        help="set the gene's count in every cell to COUNT, or without one to the cell's highest count",
    )
    perturbations.add_argument(
        "--top-genes",
        type=non_negative_int,
        default=perturb.top_genes,
        metavar="N",
        help="most affected genes listed per perturbation in genes.csv; 0: all (default: %(default)s)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``transcriptformer perturb``; returns the exit code."""
    from transcriptformer.tasks.perturb import PerturbTask

    task = PerturbTask(settings=PerturbConfig(args.knock_out, args.over_express, args.top_genes))
    run_task(task, run_config_from_args(args), dry_run=args.dry_run)
    return 0
