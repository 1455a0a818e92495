"""``transcriptformer predict-labels``: classify cells with a classifier from ``finetune --task classify``.

The output is the input ``.h5ad`` with the predictions added (``key`` the classifier's label key):
``obs["predicted_<key>"]``, ``obs["predicted_<key>_probability"]``, ``obsm["<key>_probabilities"]`` and
``uns["<key>_probabilities"]["classes"]`` (see :meth:`transcriptformer.api.TranscriptFormerModel.classify`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transcriptformer.cli.common import USE_RAW, add_overwrite_argument, add_use_raw_argument, positive_int
from transcriptformer.config import PredictSettings
from transcriptformer.runtime import DEVICES

OUTPUT_PATH = "./predictions"
OUTPUT_FILENAME = "predicted_labels.h5ad"

EXAMPLES = """\
examples:
  # train a cell-type classifier on the demo model, then label cells with it
  transcriptformer finetune --task classify --label-key cell_type --checkpoint-path models/demo-mouse-brain \\
      --train-files test/data/mouse_brain_1k.h5ad --val-fraction 0.15 --lr 3e-3 --epochs 20 --devices cpu \\
      --output-path classifiers/demo
  transcriptformer predict-labels --checkpoint-path models/demo-mouse-brain --adapter classifiers/demo \\
      --data-file test/data/demo_mouse_brain_heldout.h5ad --output-path predictions

documentation: docs/training.md
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``predict-labels``."""
    parser.description = (
        "Label cells with a classifier trained by 'transcriptformer finetune --task classify': write the input "
        ".h5ad with each cell's predicted class, its probability and the probabilities of every class."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    io = parser.add_argument_group("inputs and output")
    io.add_argument("--checkpoint-path", required=True, help="the base checkpoint the classifier was trained on")
    io.add_argument("--adapter", required=True, help="folder written by 'finetune --task classify' (adapters and head)")
    io.add_argument("--data-file", required=True, metavar="H5AD", help="cells to label (.h5ad)")
    add_use_raw_argument(io)
    io.add_argument("--gene-col-name", default=None, help="var column with gene ids (default: the checkpoint's)")
    io.add_argument("--output-path", default=OUTPUT_PATH, help="output directory (default: %(default)s)")
    io.add_argument("--output-filename", default=OUTPUT_FILENAME, help="output file name (default: %(default)s)")
    add_overwrite_argument(io, "an output file")
    io.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default: %(default)s)")
    io.add_argument(
        "--batch-size",
        type=positive_int,
        default=PredictSettings.batch_size,
        help="cells per forward pass; results do not depend on it (default: %(default)s)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Classify the cells and write them with their predictions; print the output's path."""
    from transcriptformer.api import load
    from transcriptformer.console import say
    from transcriptformer.data.tokenize import read_anndata
    from transcriptformer.engine.output import claim_output, write_anndata
    from transcriptformer.model.classifier import read_classifier_info
    from transcriptformer.runtime import use_cpu_threads

    path = Path(args.output_path) / args.output_filename
    with claim_output(path, args.overwrite):
        label_key = read_classifier_info(args.adapter).label_key  # a folder without a classifier fails first
        adata = read_anndata(args.data_file)
        threads = use_cpu_threads()
        model = load(args.checkpoint_path, args.device, adapter=args.adapter)
        say(f"Classifying {adata.n_obs} cells by {label_key!r} on {model.device.type} ({threads} CPU threads)")
        tokenize = {"gene_col_name": args.gene_col_name} if args.gene_col_name else {}
        model.classify(adata, batch_size=args.batch_size, use_raw=USE_RAW[args.use_raw], **tokenize)
        write_anndata(adata, path)
    predicted = adata.obs[f"predicted_{label_key}"].value_counts()
    say("Predicted: " + ", ".join(f"{name} {count}" for name, count in predicted.items() if count))
    print(f"Output: {path.resolve()}")
    return 0
