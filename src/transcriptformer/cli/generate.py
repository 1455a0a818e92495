"""``transcriptformer generate``: sample cells from a checkpoint (docs/generate.md)."""

from __future__ import annotations

import argparse

from transcriptformer.cli.common import (
    CHECKPOINT_HELP,
    USE_RAW,
    add_num_gpus_argument,
    add_output_arguments,
    add_use_raw_argument,
    checkpoint_folder,
    positive_int,
    run_task,
)
from transcriptformer.engine.config import RunConfig, default_output_path
from transcriptformer.runtime import DEVICES
from transcriptformer.tasks.generate import GenerateConfig, GenerateTask

OUTPUT_DEFAULTS = RunConfig().replace(
    output_path=default_output_path("generate"), output_filename="generated.h5ad", chunk_size=256
)

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
    """Add the arguments of ``generate``; their defaults are :class:`GenerateConfig`'s and :data:`OUTPUT_DEFAULTS`'."""
    defaults, output, hardware = GenerateConfig(), OUTPUT_DEFAULTS.output, OUTPUT_DEFAULTS.hardware
    parser.description = (
        "Sample cells from a TranscriptFormer checkpoint, gene by gene (gene-id head) with their counts (count "
        "head), and write their counts over the vocabulary's genes to an .h5ad file."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    io = parser.add_argument_group("inputs and output")
    io.add_argument("--checkpoint-path", required=True, help=CHECKPOINT_HELP)
    io.add_argument(
        "--data-file",
        dest="data_files",
        nargs=1,
        default=[],
        metavar="FILE",
        help="real cells (.h5ad, .zarr, 10x .h5): generated cell i takes the assay, number of genes and total "
        "count of cell i modulo their number",
    )
    add_use_raw_argument(io)
    io.add_argument("--gene-col-name", default=None, help="var column of the --data-file with gene ids")
    add_output_arguments(io, output)
    io.add_argument("--device", choices=DEVICES, default=hardware.device, help="where to run (default: %(default)s)")
    add_num_gpus_argument(io, hardware.num_gpus)
    io.add_argument(
        "--chunk-size",
        type=positive_int,
        default=output.chunk_size,
        help="cells generated and saved together; --resume granularity (default: %(default)s)",
    )

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


def settings_from_args(args: argparse.Namespace) -> GenerateConfig:
    """The :class:`GenerateConfig` of the flags, which share their names (``--aux`` as pairs)."""
    import dataclasses

    flags = vars(args) | {"aux": parse_aux(args.aux)}
    return GenerateConfig(**{f.name: flags[f.name] for f in dataclasses.fields(GenerateConfig)})


def config_from_args(args: argparse.Namespace):
    """The run's settings: the checkpoint's, the output and hardware flags; prompt cells without counts left out."""
    import dataclasses

    run = {name: getattr(args, name) for name in ("data_files", "output_path", "output_filename", "overwrite")}
    run |= {name: getattr(args, name) for name in ("resume", "device", "num_gpus", "chunk_size")}
    config = RunConfig.from_checkpoint(checkpoint_folder(args.checkpoint_path), use_raw=USE_RAW[args.use_raw], **run)
    data = {"drop_empty_cells": True} | ({"gene_col_name": args.gene_col_name} if args.gene_col_name else {})
    config.model.data_config = dataclasses.replace(config.model.data_config, **data)
    return config


def parse_aux(values: list[str]) -> dict[str, str]:
    """``COLUMN=VALUE`` pairs of ``--aux``."""
    pairs = [value.partition("=") for value in values]
    bad = [value for value, (_, sep, _) in zip(values, pairs, strict=True) if not sep]
    if bad:
        raise ValueError(f"--aux takes COLUMN=VALUE pairs, got {bad}")
    return {column: value for column, _, value in pairs}


def run(args: argparse.Namespace) -> int:
    """Entry point of ``transcriptformer generate``; returns the exit code."""
    task = GenerateTask(settings=settings_from_args(args))
    if not args.data_files:
        task.planned_rows(None)  # the settings that stand in for prompt cells, checked before torch loads
    run_task(task, config_from_args(args))
    return 0
