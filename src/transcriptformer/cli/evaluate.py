"""``transcriptformer evaluate``: compare cell embeddings and baselines on labelled cells (table, JSON, figures)."""

from __future__ import annotations

import argparse
import dataclasses

from transcriptformer.cli.common import CHECKPOINT_HELP, add_overwrite_argument, checkpoint_folder, positive_int
from transcriptformer.console import print_output
from transcriptformer.errors import UserError
from transcriptformer.evaluation.config import SAMPLE_AGGREGATIONS, EvaluateConfig
from transcriptformer.runtime import DEVICES

EXAMPLES = """\
examples:
  # the bundled demo model against the PCA and esm2ce baselines, on the bundled mouse brain cells
  transcriptformer evaluate --data-file test/data/mouse_brain_1k.h5ad --label-key cell_type \\
      --checkpoint-path models/demo-mouse-brain --output-path evaluation

  # embeddings already in the file, side by side, with batch mixing
  transcriptformer evaluate --data-file cells.h5ad --label-key cell_type --batch-key donor_id \\
      --obsm-key X_scVI --obsm-key X_transcriptformer

documentation: docs/evaluation.md
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``evaluate``; their defaults are :class:`EvaluateConfig`'s."""
    parser.description = (
        "Judge cell embeddings on labelled cells with cz-benchmarks 0.15.1's tasks (label prediction, clustering, "
        "embedding, batch and cross-species integration, cross-species label prediction, sequential organisation, "
        "perturbation-expression prediction) "
        "and a kNN without scaling, for embeddings in obsm, "
        "checkpoints run here, and the PCA and esm2ce baselines. Prints a table; writes results.json, umap.png "
        "and metrics.png."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    cells = parser.add_argument_group("cells")
    cells.add_argument("--data-file", required=True, help=".h5ad file: counts in raw.X or X, labels in obs")
    cells.add_argument("--label-key", required=True, help="obs column of the cell labels, e.g. cell_type")
    cells.add_argument("--batch-key", help="obs column of the batches: adds batch mixing (entropy, silhouette)")
    cells.add_argument(
        "--species-key", help="obs column of the species: adds cross-species integration and label transfer"
    )
    cells.add_argument(
        "--sample-key",
        help="obs column of the samples (donors): cross-species label prediction on each sample's embedding",
    )
    cells.add_argument(
        "--sample-aggregation",
        choices=SAMPLE_AGGREGATIONS,
        default=EvaluateConfig.sample_aggregation,
        help="how --sample-key's cells make a sample's embedding (default: %(default)s)",
    )
    cells.add_argument("--time-key", help="obs column of a numeric time (days, hours): adds sequential organisation")
    cells.add_argument(
        "--perturbation-key",
        help="obs column of each cell's perturbation (the gene(s) perturbed, or --control-value): judges the "
        "--checkpoint-path models' perturb predictions (cz-benchmarks' perturbation-expression prediction)",
    )
    cells.add_argument(
        "--control-value",
        default=EvaluateConfig.control_value,
        help="value of --perturbation-key that marks control cells (default: %(default)s)",
    )
    methods = parser.add_argument_group("embeddings (PCA of the counts too, when the file holds counts)")
    methods.add_argument(
        "--checkpoint-path",
        action="append",
        default=[],
        metavar="PATH",
        help=f"{CHECKPOINT_HELP}; run on the cells, it also gives its esm2ce baseline (repeatable)",
    )
    methods.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR",
        help="LoRA adapters of the one --checkpoint-path, evaluated beside it (repeatable)",
    )
    methods.add_argument(
        "--obsm-key",
        action="append",
        default=[],
        metavar="KEY",
        help="embedding in the file's obsm (repeatable); with no --obsm-key nor --checkpoint-path: X_transcriptformer "
        "or embeddings, when the file has one",
    )
    methods.add_argument(
        "--batch-size",
        type=positive_int,
        default=EvaluateConfig.batch_size,
        help="cells per forward pass of a checkpoint (default: %(default)s)",
    )
    methods.add_argument(
        "--device",
        choices=DEVICES,
        default=EvaluateConfig.device,
        help="where checkpoints run; auto: CUDA, then MPS, then CPU (default: %(default)s)",
    )
    run = parser.add_argument_group("run and report")
    run.add_argument(
        "--output-path",
        default=EvaluateConfig.output_path,
        help="folder of results.json, umap.png and metrics.png (default: %(default)s)",
    )
    run.add_argument(
        "--seed",
        type=int,
        default=EvaluateConfig.seed,
        help="seed of folds, classifiers, PCA, Leiden and UMAP: the same seed gives the same results "
        "(default: %(default)s, cz-benchmarks')",
    )
    run.add_argument(
        "--save-embeddings",
        action="store_true",
        help="also write embeddings.h5ad: the evaluated cells with every method's embedding in obsm, named as in "
        "the report",
    )
    add_overwrite_argument(run, "a report")
    parser.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate, print the table, say where the report is; the flags are checked before anything heavy loads."""
    names = {field.name for field in dataclasses.fields(EvaluateConfig)}
    try:
        config = EvaluateConfig(**{name: value for name, value in vars(args).items() if name in names})
    except ValueError as error:  # its messages start with the setting's name
        name, _, rest = str(error).partition(" ")
        raise UserError(f"--{name.replace('_', '-')} {rest}" if name in names else str(error)) from None
    config.checkpoint_path = [checkpoint_folder(path) for path in config.checkpoint_path]
    from transcriptformer.evaluation import require_extra

    require_extra()
    from transcriptformer.evaluation.report import EMBEDDINGS_FILE, REPORT_FILES, format_table
    from transcriptformer.evaluation.run import evaluate

    results = evaluate(config)
    print(format_table(results))
    files = [*REPORT_FILES, EMBEDDINGS_FILE] if config.save_embeddings else REPORT_FILES
    print(f"Report: {', '.join(files)}")
    print_output(config.output_path)
    return 0
