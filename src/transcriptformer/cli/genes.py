"""``transcriptformer genes``: list the genes of a checkpoint's vocabulary (id, symbol, species)."""

from __future__ import annotations

import argparse

from transcriptformer.cli.common import CHECKPOINT_HELP, checkpoint_folder

EXAMPLES = """examples:
  transcriptformer genes --checkpoint-path models/demo-mouse-brain --search sox
  transcriptformer genes --checkpoint-path tf-metazoa --species
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``genes``."""
    parser.description = (
        "List the genes of a checkpoint's vocabulary: the genes it reads, perturbs and generates. Prints gene id, "
        "symbol (bundled human and mouse tables) and species (the gene-embedding file), one gene a line."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--checkpoint-path", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--search", metavar="TEXT", help="only genes whose id or symbol contains TEXT (any case)")
    parser.add_argument("--species", action="store_true", help="print the species and their numbers of genes instead")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the vocabulary's genes, or its species."""
    from transcriptformer.checkpoint import vocabulary_genes

    table = vocabulary_genes(checkpoint_folder(args.checkpoint_path), args.search)
    if args.species:
        counts = table.groupby("species", sort=False).size()
        print(counts.rename("genes").reset_index().to_string(index=False))
    elif table.empty:
        print(f"no gene of the vocabulary matches {args.search!r}")
    else:
        print(table.to_string(index=False))
    return 0
