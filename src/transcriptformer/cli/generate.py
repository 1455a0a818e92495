"""``transcriptformer generate``: sample cells from a checkpoint (docs/generate.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from transcriptformer.cli.common import USE_RAW, add_overwrite_argument, add_use_raw_argument, positive_int
from transcriptformer.config import GenerateSettings
from transcriptformer.runtime import DEVICES

OUTPUT_PATH = "./generated"
OUTPUT_FILENAME = "generated.h5ad"

EXAMPLES = """\
examples:
  # one new cell per real cell, with its assay, number of genes and total count
  transcriptformer generate --checkpoint-path models/demo-mouse-brain \\
      --data-file test/data/demo_mouse_brain_heldout.h5ad --output-path generated

  # 10 cells of 50 genes and 100 counts each, starting with two given genes
  transcriptformer generate --checkpoint-path models/demo-mouse-brain --num-cells 10 --num-genes 50 \\
      --library-size 100 --genes Crym Vgf --aux "assay=MERFISH" --output-path generated

documentation: docs/generate.md
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``generate``; their defaults are :class:`GenerateSettings`'."""
    defaults = GenerateSettings()
    parser.description = (
        "Sample cells from a TranscriptFormer checkpoint, gene by gene (gene-id head) with their counts (count "
        "head), and write their counts over the vocabulary's genes to an .h5ad file."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    io = parser.add_argument_group("inputs and output")
    io.add_argument("--checkpoint-path", required=True, help="checkpoint directory (config.json, model_weights.pt)")
    io.add_argument(
        "--data-file",
        default=None,
        metavar="FILE",
        help="real cells (.h5ad, .zarr, 10x .h5): generated cell i takes the assay, number of genes and total "
        "count of cell i modulo their number",
    )
    add_use_raw_argument(io)
    io.add_argument("--gene-col-name", default=None, help="var column of the --data-file with gene ids")
    io.add_argument("--output-path", default=OUTPUT_PATH, help="output directory (default: %(default)s)")
    io.add_argument("--output-filename", default=OUTPUT_FILENAME, help="output file name (default: %(default)s)")
    add_overwrite_argument(io, "an output file")
    io.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default: %(default)s)")

    cells = parser.add_argument_group("the cells")
    cells.add_argument(
        "--num-cells",
        type=positive_int,
        default=defaults.num_cells,
        help="cells to generate (default: one per --data-file cell)",
    )
    cells.add_argument(
        "--max-genes", type=positive_int, default=defaults.max_genes, help="genes per cell at most (default: seq_len)"
    )
    cells.add_argument(
        "--num-genes",
        type=positive_int,
        default=defaults.num_genes,
        help="genes per cell to aim at (default: the --data-file cell's, else --max-genes)",
    )
    cells.add_argument(
        "--library-size",
        type=float,
        default=defaults.library_size,
        help="total count of a cell over its genes, after clipping (default: the --data-file cell's)",
    )
    cells.add_argument(
        "--aux",
        nargs="+",
        default=[],
        metavar="COLUMN=VALUE",
        help="condition every cell on an aux value, e.g. assay=MERFISH (default: the --data-file cell's, else unknown)",
    )
    prompts = cells.add_mutually_exclusive_group()
    prompts.add_argument(
        "--prompt-genes",
        type=int,
        default=defaults.prompt_genes,
        help="start each cell with the first N genes and counts of its --data-file cell (default: %(default)s)",
    )
    prompts.add_argument(
        "--genes", nargs="+", default=[], metavar="GENE", help="start each cell with these genes (ids or symbols)"
    )

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=defaults.temperature, help="(default: %(default)s)")
    sampling.add_argument("--top-k", type=int, default=defaults.top_k, help="0: all genes (default: %(default)s)")
    sampling.add_argument("--top-p", type=float, default=defaults.top_p, help="1: all genes (default: %(default)s)")
    sampling.add_argument("--seed", type=int, default=defaults.seed, help="(default: %(default)s)")
    sampling.add_argument(
        "--batch-size",
        type=positive_int,
        default=defaults.batch_size,
        help="cells generated together (default: %(default)s); results do not depend on it",
    )
    sampling.add_argument(
        "--use-cache",
        action=argparse.BooleanOptionalAction,
        default=defaults.use_cache,
        help="decode with the key/value cache; --no-use-cache reruns the whole sequence per gene (default: "
        "%(default)s)",
    )
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> GenerateSettings:
    """The :class:`GenerateSettings` of the flags, which share their names."""
    import dataclasses

    return GenerateSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GenerateSettings)})


def parse_aux(values: list[str]) -> dict[str, str]:
    """``COLUMN=VALUE`` pairs of ``--aux``."""
    pairs = [value.partition("=") for value in values]
    bad = [value for value, (_, sep, _) in zip(values, pairs, strict=True) if not sep]
    if bad:
        raise ValueError(f"--aux takes COLUMN=VALUE pairs, got {bad}")
    return {column: value for column, _, value in pairs}


def run(args: argparse.Namespace) -> int:
    """Generate and write the cells; print the output's path."""
    from transcriptformer.checkpoint import load_checkpoint
    from transcriptformer.console import say
    from transcriptformer.engine.output import claim_output, write_anndata
    from transcriptformer.generation import generate
    from transcriptformer.runtime import resolve_device, use_cpu_threads

    settings, aux = settings_from_args(args), parse_aux(args.aux)
    path = Path(args.output_path) / args.output_filename
    with claim_output(path, args.overwrite):
        device = resolve_device(args.device)
        threads = use_cpu_threads()
        checkpoint = load_checkpoint(args.checkpoint_path, device)
        prompt_cells = None
        if args.data_file is not None:
            data_config = {"drop_empty_cells": True}
            if args.gene_col_name:
                data_config["gene_col_name"] = args.gene_col_name
            prompt_cells = checkpoint.tokenizer(**data_config).tokenize(args.data_file, USE_RAW[args.use_raw])
        say(f"Generating on {device.type} ({threads} CPU threads)")
        adata = generate(checkpoint, settings, device, prompt_cells, aux, args.genes)
        write_anndata(adata, path)
    genes, counts, ended = adata.obs["num_genes"], adata.obs["total_counts"], adata.obs["ended"]
    say(
        f"Generated {adata.n_obs} cells: median {genes.median():g} genes and {counts.median():g} counts per cell; "
        f"{int(ended.sum())} ended with [END]"
    )
    print(f"Output: {path.resolve()}")
    return 0
