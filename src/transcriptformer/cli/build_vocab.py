"""``transcriptformer build-vocab``: a gene-embedding table for a new species from its proteins and ESM-2."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from transcriptformer.cli.common import add_hidden_alias, add_overwrite_argument
from transcriptformer.console import print_output
from transcriptformer.data.esm_vocab import DEFAULT_LAYER, DEFAULT_MAX_RESIDUES, GENE_ID_RULES
from transcriptformer.runtime import resolve_device

if TYPE_CHECKING:
    from transcriptformer.data.esm_vocab import VocabReport

EXAMPLES = """\
examples:
  # Ensembl peptide FASTA (headers carry gene:ENS...), the ESM-2 model the published tables used
  transcriptformer build-vocab --fasta Xenopus_tropicalis.UCB_Xtro_10.0.pep.all.fa.gz \\
      --esm-model esm2_t36_3B_UR50D.pt --species xenopus_tropicalis --check-data frog_cells.h5ad

  # UniProt proteome, gene names from GN=
  transcriptformer build-vocab --fasta proteome.fasta --gene-id-rule uniprot --esm-model esm2_t36_3B_UR50D.pt \\
      --species my_species --check-data cells.h5ad --gene-col-name gene_symbol

Then: transcriptformer inference ... --pretrained-embedding <species>_gene.h5

documentation: docs/downloads.md (new species)
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``build-vocab``."""
    parser.description = (
        "Embed the longest protein of each gene with ESM-2 (mean over residues) and write a "
        "gene-embedding table for a species no checkpoint knows."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--fasta", required=True, help="protein FASTA, plain or .gz (several isoforms per gene)")
    parser.add_argument(
        "--esm-model", required=True, help="fair-esm ESM-2 checkpoint (.pt), or a model name in the torch hub cache"
    )
    parser.add_argument("--species", required=True, help="species name of the file: <species>_gene.h5")
    output = parser.add_argument("--output-path", default=".", help="folder of the output file (default: %(default)s)")
    add_hidden_alias(parser, "--output-dir", output)
    add_overwrite_argument(parser, "a table of that species")
    parser.add_argument(
        "--gene-id-rule",
        default="ensembl",
        help=f"how to read the gene id from a header: {', '.join(GENE_ID_RULES)}, or a regular expression with "
        "one group (default: %(default)s)",
    )
    parser.add_argument("--keep-version", action="store_true", help="keep a .N version suffix on gene ids")
    parser.add_argument(
        "--layer", type=int, default=DEFAULT_LAYER, help="ESM-2 layer to average (default: %(default)s, as published)"
    )
    parser.add_argument(
        "--max-residues",
        type=int,
        default=DEFAULT_MAX_RESIDUES,
        help="truncate proteins to this many residues (default: %(default)s)",
    )
    parser.add_argument(
        "--tokens-per-batch", type=int, default=8192, help="padded tokens per ESM-2 pass (default: %(default)s)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, ... (default: %(default)s)",
    )
    parser.add_argument("--check-data", default=None, help="an .h5ad file: report how many of its genes get a vector")
    parser.add_argument(
        "--gene-col-name", default="ensembl_id", help="gene id column of --check-data (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the table while holding the output's lock (what killed runs left is removed first); print the report."""
    from transcriptformer.data.esm_vocab import check_output_free, table_path
    from transcriptformer.data.vocab import remove_partial_tables
    from transcriptformer.engine.output import hold_output

    output = table_path(args.output_path, args.species)
    check_output_free(output, args.overwrite)  # before the lock file: none is left beside a refused output
    with hold_output(output, ("output_path", "`species`")):
        remove_partial_tables(output)
        report = build_table(args, output)
    print(report.summary())
    print_output(output)
    return 0


def build_table(args: argparse.Namespace, output: Path) -> VocabReport:
    """The table of ``args`` written to ``output``."""
    from transcriptformer.data.esm_vocab import build_vocab

    return build_vocab(
        args.fasta,
        args.esm_model,
        output,
        rule=args.gene_id_rule,
        strip_version=not args.keep_version,
        layer=args.layer,
        max_residues=args.max_residues,
        tokens_per_batch=args.tokens_per_batch,
        device=resolve_device(args.device),
        check_data=args.check_data,
        gene_col_name=args.gene_col_name,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
