"""``transcriptformer inference``: embeddings and likelihoods for the cells of one or more ``.h5ad`` files.

The flags are those of the original release, with the same meanings and defaults; ``--config-override`` takes
Hydra's override grammar on the settings tree of :mod:`transcriptformer.inference.config`.
"""

from __future__ import annotations

import argparse
import dataclasses

from transcriptformer.cli.common import (
    USE_RAW,
    add_invalid_counts_argument,
    add_overwrite_argument,
    add_use_raw_argument,
    non_negative_int,
    positive_int,
    positive_number,
)
from transcriptformer.config import DataConfig
from transcriptformer.errors import UserError
from transcriptformer.inference.config import (
    ALL_OBS_KEYS,
    EMB_TYPES,
    MODEL_TYPES,
    InferenceConfig,
    ModelSection,
    RunConfig,
)
from transcriptformer.model.outputs import OUTPUT_KEYS
from transcriptformer.runtime import BACKENDS, DEVICES, PRECISIONS

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


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``inference``; their defaults are :class:`InferenceConfig`'s and the checkpoint's."""
    defaults = InferenceConfig()
    parser.description = (
        "Run a TranscriptFormer checkpoint on the cells of one or more files (.h5ad, .zarr, 10x .h5) "
        "and write their embeddings and likelihoods to one .h5ad file."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    io = parser.add_argument_group("inputs and output")
    io.add_argument("--checkpoint-path", required=True, help="checkpoint directory (config.json, model_weights.pt)")
    io.add_argument(
        "--data-file",
        required=True,
        nargs="+",
        metavar="FILE",
        help="input .h5ad, .zarr or 10x .h5 file(s), their cells concatenated in order",
    )
    io.add_argument("--output-path", default=defaults.output_path, help="output directory (default: %(default)s)")
    io.add_argument(
        "--output-filename", default=defaults.output_filename, help="output file name (default: %(default)s)"
    )
    add_overwrite_argument(io, "an output file")
    io.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run with the same settings from its last completed chunk of cells",
    )
    io.add_argument(
        "--output-keys",
        nargs="+",
        choices=OUTPUT_KEYS,
        default=defaults.output_keys,
        metavar="KEY",
        help=f"outputs to compute, any of {', '.join(OUTPUT_KEYS)} (default: %(default)s)",
    )
    io.add_argument(
        "--obs-keys",
        nargs="+",
        default=defaults.obs_keys,
        metavar="COLUMN",
        help=f"obs columns to keep in the output; {ALL_OBS_KEYS}: every column (default: %(default)s)",
    )
    io.add_argument(
        "--emb-type",
        choices=EMB_TYPES,
        default=defaults.emb_type,
        help="cell: cell embeddings; cge: also contextual gene embeddings, one per gene of each cell "
        "(default: %(default)s)",
    )
    io.add_argument("--dry-run", action="store_true", help="check checkpoint, data and vocabulary, print the plan")

    data = parser.add_argument_group("reading the cells (defaults: the checkpoint's data_config)")
    data.add_argument("--gene-col-name", default=None, help="var column with gene ids; 'index': var_names")
    add_use_raw_argument(data)
    data.add_argument("--clip-counts", type=positive_number, default=None, help="clip counts to at most this value")
    add_invalid_counts_argument(data)
    data.add_argument(
        "--drop-empty-cells",
        action="store_true",
        default=DataConfig.drop_empty_cells,
        help="leave out the cells without any count among the genes read; kept, they get NaN outputs "
        "and are counted in the summary",
    )
    data.add_argument(
        "--filter-to-vocabs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drop genes the vocabulary lacks; with --no-filter-to-vocabs they are an error",
    )
    data.add_argument(
        "--remove-duplicate-genes",
        action="store_true",
        help="keep the first of duplicated gene ids instead of stopping with an error",
    )
    data.add_argument(
        "--oom-dataloader",
        dest="use_oom_dataloader",
        action="store_true",
        help="the original's streaming data loader; cells are always streamed in chunks here, so it changes nothing",
    )
    data.add_argument(
        "--n-data-workers",
        type=non_negative_int,
        default=defaults.n_data_workers,
        help="threads reading and tokenizing the next cells while the model runs (default: %(default)s)",
    )

    model = parser.add_argument_group("model and hardware")
    model.add_argument(
        "--model-type",
        choices=MODEL_TYPES,
        default=ModelSection.model_type,
        help="transcriptformer, or esm2ce: the mean of the cell's raw gene-embedding rows, no transformer "
        "(default: %(default)s)",
    )
    model.add_argument(
        "--pretrained-embedding",
        nargs="+",
        default=defaults.pretrained_embedding,
        metavar="H5",
        help="gene-embedding file(s) replacing the model's table, for a species it was not trained on",
    )
    model.add_argument(
        "--adapter",
        default=defaults.adapter,
        metavar="DIR",
        help="LoRA adapters from 'transcriptformer finetune', merged into the checkpoint's weights",
    )
    model.add_argument(
        "--batch-size",
        type=positive_int,
        default=defaults.batch_size,
        help="cells per forward pass (default: %(default)s)",
    )
    model.add_argument(
        "--max-tokens-per-batch",
        dest="max_tokens",
        type=positive_int,
        default=defaults.max_tokens,
        metavar="N",
        help="token budget per forward pass (cells x trimmed length) instead of a fixed --batch-size",
    )
    model.add_argument(
        "--chunk-size",
        type=positive_int,
        default=defaults.chunk_size,
        help="cells read, run and saved together; memory and --resume granularity (default: %(default)s)",
    )
    model.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="32, or mixed precision 16-mixed / bf16-mixed (default: 16-mixed on CUDA, 32 elsewhere)",
    )
    model.add_argument(
        "--device",
        choices=DEVICES,
        default=defaults.device,
        help="auto: CUDA, then MPS, then CPU (default: %(default)s)",
    )
    model.add_argument(
        "--num-gpus",
        type=int,
        default=defaults.num_gpus,
        help="processes, one per GPU; -1: every visible GPU; on CPU, CPU processes (default: %(default)s)",
    )
    model.add_argument(
        "--attention-backend",
        choices=BACKENDS,
        default=defaults.attention_backend,
        help="auto: compiled flex attention on CUDA, exact chunked attention elsewhere (default: %(default)s)",
    )
    model.add_argument(
        "--disable-compile-block-mask",
        action="store_true",
        help="attention without torch.compile (the original's flag): turns auto into chunked, also on CUDA",
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
    from transcriptformer.inference.config import apply_overrides

    # A flag named like an InferenceConfig field sets it; one named like a DataConfig field, when given,
    # replaces the checkpoint's value.
    flags = vars(args) | {
        "data_files": args.data_file,
        "use_raw": USE_RAW[args.use_raw],
        "attention_backend": attention_backend_of(args),
    }
    inference = InferenceConfig(**{f.name: flags[f.name] for f in dataclasses.fields(InferenceConfig)})
    config = RunConfig.from_checkpoint(args.checkpoint_path, inference, args.model_type)
    given = {f.name: flags[f.name] for f in dataclasses.fields(DataConfig) if flags.get(f.name) is not None}
    config.model.data_config = dataclasses.replace(config.model.data_config, **given)  # checks the values
    return apply_overrides(config, args.config_override)


def attention_backend_of(args: argparse.Namespace) -> str:
    """``--attention-backend``, with the original's ``--disable-compile-block-mask``: no compiled attention."""
    if not args.disable_compile_block_mask:
        return args.attention_backend
    if args.attention_backend == "flex":
        raise UserError(
            "--disable-compile-block-mask asks for attention without torch.compile, but --attention-backend flex "
            "compiles it on CUDA; drop one of the two (chunked and dense are never compiled)"
        )
    return "chunked" if args.attention_backend == "auto" else args.attention_backend


def run(args: argparse.Namespace) -> int:
    """Entry point of ``transcriptformer inference``; returns the exit code."""
    from transcriptformer.inference.runner import run_inference

    run_inference(config_from_args(args), dry_run=args.dry_run)
    return 0
