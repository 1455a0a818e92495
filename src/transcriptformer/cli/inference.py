"""``transcriptformer inference``: embeddings and likelihoods for the cells of one or more ``.h5ad`` files.

The flags are those of the original release, with the same meanings and defaults; ``--config-override`` takes
Hydra's override grammar on the settings tree of :mod:`transcriptformer.engine.config`.
"""

from __future__ import annotations

import argparse

from transcriptformer.cli.common import add_run_arguments, run_config_from_args, run_task
from transcriptformer.engine.config import EMB_TYPES, MODEL_TYPES, OUTPUT_FORMATS, ModelRunConfig, RunConfig
from transcriptformer.errors import UserError

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

  # the lung cells of a copy of the CELLxGENE Census, embeddings into a SOMA array
  transcriptformer inference --checkpoint-path CKPT --soma census/ --organism homo_sapiens \\
      --obs-filter "tissue_general == 'lung' and is_primary_data == True" --output-soma lung_embeddings

documentation: docs/inference.md
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``inference``; their defaults are :class:`RunConfig`'s and the checkpoint's."""
    defaults = RunConfig()
    output = defaults.output
    parser.description = (
        "Run a TranscriptFormer checkpoint on the cells of one or more files (.h5ad, .zarr, 10x .h5) or of a "
        "TileDB-SOMA experiment and write their embeddings and likelihoods to one .h5ad file (or a SOMA array)."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    io, data, model = add_run_arguments(parser, defaults)
    io.add_argument(
        "--output-soma",
        metavar="URI",
        default=output.output_soma,
        help="also or instead (--output-format) write the cell embeddings of a SOMA input to a SOMA array here, "
        "indexed by soma_joinid as the Census' hosted embeddings (folder or s3:// URI)",
    )
    io.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        default=output.output_format,
        help="what to write: the .h5ad, the SOMA array (--output-soma), or both (default: soma with --output-soma, "
        "else h5ad)",
    )
    io.add_argument(
        "--emb-type",
        choices=EMB_TYPES,
        default=output.emb_type,
        help="cell: cell embeddings; cge: also contextual gene embeddings, one per gene of each cell "
        "(default: %(default)s)",
    )
    io.add_argument(
        "--embedding-layer-index",
        type=int,
        default=defaults.predict.embedding_layer_index,
        metavar="N",
        help="the layer whose output the cell embedding pools: 0 the first, negative from the end "
        "(default: %(default)s, the last layer, as the original release)",
    )
    data.add_argument(
        "--oom-dataloader",
        dest="use_oom_dataloader",
        action="store_true",
        help="the original's streaming data loader; cells are always streamed in chunks here, so it changes nothing",
    )
    model.add_argument(
        "--model-type",
        choices=MODEL_TYPES,
        default=ModelRunConfig.model_type,
        help="transcriptformer, or esm2ce: the mean of the cell's raw gene-embedding rows, no transformer "
        "(default: %(default)s)",
    )
    model.add_argument(
        "--disable-compile-block-mask",
        action="store_true",
        help="attention without torch.compile (the original's flag): turns auto into chunked, also on CUDA",
    )
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's settings: the checkpoint's config, then the flags, then ``--config-override``."""
    return run_config_from_args(args, attention_backend=attention_backend_of(args))


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
    from transcriptformer.tasks.embed import EmbedTask

    run_task(EmbedTask(), config_from_args(args), dry_run=args.dry_run)
    return 0
