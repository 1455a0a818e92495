"""``transcriptformer predict-labels``: classify cells with a classifier from ``finetune --task classify``.

The flags of a run are those of ``transcriptformer inference`` (:func:`~transcriptformer.cli.common.add_run_arguments`):
the job runs through the engine, with resume, several processes and the output lock. The output holds the input's
obs with the predictions added (``key`` the classifier's label key): ``obs["predicted_<key>"]``,
``obs["predicted_<key>_probability"]``, ``obsm["<key>_probabilities"]`` and ``uns["<key>_probabilities"]``
(:mod:`transcriptformer.tasks.classify`).
"""

from __future__ import annotations

import argparse

from transcriptformer.cli.common import add_run_arguments, run_config_from_args, run_task
from transcriptformer.engine.config import RunConfig, default_output_path

OUTPUT_DEFAULTS = RunConfig().replace(
    output_path=default_output_path("predict-labels"),
    output_filename="predicted_labels.h5ad",
    output_keys=["embeddings"],
)

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
    """Add the arguments of ``predict-labels``: those of an inference run, into ``predict_labels_results/``."""
    parser.description = (
        "Label cells with a classifier trained by 'transcriptformer finetune --task classify' (give its folder with "
        "--adapter): write the cells' obs with each cell's predicted class, its probability and the probabilities "
        "of every class to one .h5ad file."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_run_arguments(parser, OUTPUT_DEFAULTS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``transcriptformer predict-labels``; returns the exit code."""
    from transcriptformer.tasks.classify import ClassifyTask

    run_task(ClassifyTask(), run_config_from_args(args), dry_run=args.dry_run)
    return 0
