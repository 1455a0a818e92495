"""``transcriptformer perturb``: in-silico knock-outs and over-expressions of genes in the cells of a file."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transcriptformer.cli.common import (
    USE_RAW,
    add_batch_arguments,
    add_overwrite_argument,
    add_use_raw_argument,
    non_negative_int,
)
from transcriptformer.config import PredictSettings
from transcriptformer.perturbation.config import PerturbSettings

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
    """Add the arguments of ``perturb``; their defaults are :class:`PerturbSettings`' and :class:`PredictSettings`'."""
    parser.description = (
        "Knock genes out of every cell of a file, or over-express them, and measure the shift of the cell "
        "embedding, the change of the log-likelihood and of every other gene's predicted expression. Writes "
        "summary.csv, genes.csv and perturbations.h5ad to --output-path."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    io = parser.add_argument_group("inputs and output")
    io.add_argument("--checkpoint-path", required=True, help="checkpoint directory (config.json, model_weights.pt)")
    io.add_argument("--data-file", required=True, help="the cells: a .h5ad, .zarr or 10x .h5 file of raw counts")
    io.add_argument(
        "--output-path", default=PerturbSettings.output_path, help="output directory (default: %(default)s)"
    )
    add_overwrite_argument(io, "the results")
    io.add_argument("--gene-col-name", default=None, help="var column with gene ids; 'index': var_names")
    add_use_raw_argument(io)

    perturbations = parser.add_argument_group("perturbations (genes by Ensembl id or symbol; '+' joins genes)")
    perturbations.add_argument(
        "--knock-out",
        nargs="+",
        action="extend",
        default=list(PerturbSettings.knock_out),
        metavar="GENE",
        help="remove the gene from every cell, one perturbation per GENE (GENE+GENE: several at once)",
    )
    perturbations.add_argument(
        "--over-express",
        nargs="+",
        action="extend",
        default=list(PerturbSettings.over_express),
        metavar="GENE[=COUNT]",
        help="set the gene's count in every cell to COUNT, or without one to the cell's highest count",
    )
    perturbations.add_argument(
        "--top-genes",
        type=non_negative_int,
        default=PerturbSettings.top_genes,
        metavar="N",
        help="most affected genes listed per perturbation in genes.csv; 0: all (default: %(default)s)",
    )

    model = parser.add_argument_group("model and hardware")
    add_batch_arguments(
        model,
        batch_size=PredictSettings.batch_size,
        max_tokens=PredictSettings.max_tokens,
        chunk_size=PerturbSettings.chunk_size,
        chunk_help="perturbed and unperturbed cells run and reduced together; bounds memory",
        precision=PredictSettings.precision,
        device=PerturbSettings.device,
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``transcriptformer perturb``; returns the exit code."""
    from transcriptformer.api import load
    from transcriptformer.console import say
    from transcriptformer.engine.output import claim_output
    from transcriptformer.perturbation.output import CELLS_FILE
    from transcriptformer.perturbation.specs import parse_perturbations

    settings = PerturbSettings(args.knock_out, args.over_express)
    model = load(args.checkpoint_path, device=args.device)
    parse_perturbations(settings.knock_out, settings.over_express, model.checkpoint.gene_vocab)  # before the output
    data_config = {"gene_col_name": args.gene_col_name} if args.gene_col_name else {}
    started = time.time()
    with claim_output(Path(args.output_path) / CELLS_FILE, args.overwrite):
        result = model.perturb(
            args.data_file,
            args.knock_out,
            args.over_express,
            top_genes=args.top_genes,
            chunk_size=args.chunk_size,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            precision=args.precision,
            use_raw=USE_RAW[args.use_raw],
            **data_config,
        )
        path = result.write_files(args.output_path)
    say(result.report(time.time() - started))
    print(f"Output: {path.resolve()}")
    return 0
