"""``transcriptformer inference``: embeddings and likelihoods for the cells of one or more ``.h5ad`` files.

The flags are those of the original release, with the same meanings and defaults; ``--config-override`` takes
Hydra's override grammar on the settings tree of :mod:`transcriptformer.inference.config`.
"""

from __future__ import annotations

import argparse
import sys

from transcriptformer.inference.config import (
    ALL_OBS_KEYS,
    DEVICES,
    EMB_TYPES,
    MODEL_TYPES,
    OUTPUT_KEYS,
    PRECISIONS,
    InferenceConfig,
    RunConfig,
    apply_overrides,
)
from transcriptformer.inference.runner import run_inference
from transcriptformer.model.attention import BACKENDS

EXAMPLES = """\
examples:
  # embeddings and per-cell likelihoods of the bundled cells, with the bundled checkpoint
  transcriptformer inference --checkpoint-path test/data/reference_tiny \\
      --data-file test/data/reference_tiny/input.h5ad --output-keys embeddings llh

  # several files, per-gene outputs, a setting without a flag of its own
  transcriptformer inference --checkpoint-path CKPT --data-file a.h5ad b.h5ad \\
      --output-keys embeddings llh mu gene_llh \\
      --config-override model.data_config.normalize_to_scale=10000

  # another species: its gene-embedding table replaces the model's
  transcriptformer inference --checkpoint-path CKPT --data-file frog.h5ad \\
      --pretrained-embedding xenopus_laevis_gene.h5

  # every GPU of the machine, one merged output file
  transcriptformer inference --checkpoint-path CKPT --data-file big.h5ad --num-gpus -1

documentation: docs/inference.md
"""

USE_RAW = {"auto": None, "true": True, "false": False}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inference`` subcommand."""
    parser = subparsers.add_parser(
        "inference",
        help="embed and score the cells of h5ad files; write one h5ad",
        description="Run a TranscriptFormer checkpoint on the cells of one or more files (.h5ad, .zarr, 10x .h5) "
        "and write their embeddings and likelihoods to one .h5ad file.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = parser.add_argument_group("inputs and output")
    io.add_argument("--checkpoint-path", required=True, help="checkpoint directory (config.json, model_weights.pt)")
    io.add_argument(
        "--data-file",
        required=True,
        nargs="+",
        metavar="FILE",
        help="input .h5ad, .zarr or 10x .h5 file(s), their cells concatenated in order",
    )
    io.add_argument("--output-path", default="./inference_results", help="output directory (./inference_results)")
    io.add_argument("--output-filename", default="embeddings.h5ad", help="output file name (embeddings.h5ad)")
    io.add_argument("--overwrite", action="store_true", help="replace an existing output file (default: keep it)")
    io.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run with the same settings from its last completed chunk of cells",
    )
    io.add_argument(
        "--output-keys",
        nargs="+",
        choices=OUTPUT_KEYS,
        default=["embeddings"],
        metavar="KEY",
        help=f"outputs to compute, any of {', '.join(OUTPUT_KEYS)} (embeddings)",
    )
    io.add_argument(
        "--obs-keys",
        nargs="+",
        default=[ALL_OBS_KEYS],
        metavar="COLUMN",
        help="obs columns to keep in the output (all)",
    )
    io.add_argument(
        "--emb-type",
        choices=EMB_TYPES,
        default="cell",
        help="cell: cell embeddings; cge: also contextual gene embeddings, one per gene of each cell (cell)",
    )
    io.add_argument("--dry-run", action="store_true", help="check checkpoint, data and vocabulary, print the plan")

    data = parser.add_argument_group("reading the cells")
    data.add_argument("--gene-col-name", default="ensembl_id", help="var column with gene ids; 'index': var_names")
    data.add_argument(
        "--use-raw",
        choices=list(USE_RAW),
        default="auto",
        help="counts from adata.raw.X (true), adata.X (false), or raw when present (auto)",
    )
    data.add_argument("--clip-counts", type=float, default=30.0, help="clip counts to at most this value (30)")
    data.add_argument(
        "--filter-to-vocabs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="drop genes the vocabulary lacks; with --no-filter-to-vocabs they are an error (on)",
    )
    data.add_argument(
        "--remove-duplicate-genes",
        action="store_true",
        help="keep the first of duplicated gene ids instead of stopping with an error",
    )
    data.add_argument(
        "--n-data-workers",
        type=int,
        default=0,
        help="threads reading and tokenizing the next cells while the model runs (0: none)",
    )

    model = parser.add_argument_group("model and hardware")
    model.add_argument(
        "--model-type",
        choices=MODEL_TYPES,
        default="transcriptformer",
        help="transcriptformer, or esm2ce: the mean of the cell's raw gene-embedding rows, no transformer",
    )
    model.add_argument(
        "--pretrained-embedding",
        nargs="+",
        default=[],
        metavar="H5",
        help="gene-embedding file(s) replacing the model's table, for a species it was not trained on",
    )
    model.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="LoRA adapters from 'transcriptformer finetune', merged into the checkpoint's weights",
    )
    model.add_argument("--batch-size", type=int, default=8, help="cells per forward pass (8)")
    model.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=None,
        metavar="N",
        help="token budget per forward pass (cells x trimmed length) instead of a fixed --batch-size",
    )
    model.add_argument(
        "--chunk-size",
        type=int,
        default=1024,
        help="cells read, run and saved together; memory and --resume granularity (1024)",
    )
    model.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="32, or mixed precision 16-mixed / bf16-mixed (16-mixed on CUDA, 32 elsewhere)",
    )
    model.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA, then MPS, then CPU (auto)")
    model.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        help="processes, one per GPU; -1: every visible GPU; on CPU, CPU processes (1)",
    )
    model.add_argument(
        "--attention-backend",
        choices=BACKENDS,
        default="auto",
        help="auto: compiled flex attention on CUDA, exact chunked attention elsewhere",
    )
    model.add_argument(
        "--config-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any setting, Hydra grammar, repeatable: model.data_config.normalize_to_scale=10000, "
        "model.inference_config.output_keys=[embeddings,llh], model.data_config.clip_counts=null",
    )
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's settings: the checkpoint's config, then the flags, then ``--config-override``."""
    inference = InferenceConfig(
        data_files=args.data_file,
        output_path=args.output_path,
        output_filename=args.output_filename,
        batch_size=args.batch_size,
        output_keys=args.output_keys,
        obs_keys=args.obs_keys,
        precision=args.precision,
        pretrained_embedding=args.pretrained_embedding,
        adapter=args.adapter,
        emb_type=args.emb_type,
        device=args.device,
        num_gpus=args.num_gpus,
        n_data_workers=args.n_data_workers,
        use_raw=USE_RAW[args.use_raw],
        remove_duplicate_genes=args.remove_duplicate_genes,
        overwrite=args.overwrite,
        resume=args.resume,
        max_tokens=args.max_tokens_per_batch,
        chunk_size=args.chunk_size,
        attention_backend=args.attention_backend,
    )
    config = RunConfig.from_checkpoint(args.checkpoint_path, inference, args.model_type)
    data = config.model.data_config
    data.gene_col_name, data.clip_counts, data.filter_to_vocabs = (
        args.gene_col_name,
        args.clip_counts,
        args.filter_to_vocabs,
    )
    return apply_overrides(config, args.config_override)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``transcriptformer inference``; returns the exit code."""
    try:
        run_inference(config_from_args(args), dry_run=args.dry_run)
    except (FileExistsError, FileNotFoundError, KeyError, RuntimeError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"transcriptformer inference: error: {message}", file=sys.stderr)
        return 1
    return 0
