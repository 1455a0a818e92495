"""An evaluation from settings to report: read the cells, gather the embeddings, run every task on each."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from transcriptformer.console import say
from transcriptformer.errors import UserError
from transcriptformer.evaluation import report, tasks
from transcriptformer.evaluation.config import EvaluateConfig
from transcriptformer.evaluation.embeddings import (
    Cells,
    Embedding,
    cells_with_every_embedding,
    gather_embeddings,
    read_cells,
)
from transcriptformer.runtime import use_cpu_threads
from transcriptformer.version import __version__


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate every embedding of ``config`` on its cells; write the report; return the results (as the JSON).

    Raises
    ------
    UserError, KeyError, ValueError
        For a missing column, a label column with fewer than two classes of ``min_class_size`` cells, a batch or
        species column with a single value, an output folder that already holds a report (without ``overwrite``).
    """
    output = check_output_path(config)
    use_cpu_threads()  # torch's threads for the checkpoints: the idle CPUs
    cells = check_columns(read_cells(config), config)
    embeddings = gather_embeddings(cells, config)
    embedded = cells_with_every_embedding(embeddings)
    if not embedded.all():
        missing = int((~embedded).sum())
        warnings.warn(
            f"{missing} cells have no embedding for some method (none of their genes known); left out", stacklevel=2
        )
        cells = check_columns(cells.subset(embedded), config)
        for embedding in embeddings:
            embedding.values = embedding.values[embedded]
    predictable = tasks.predictable_cells(cells.labels, config.min_class_size, f"label_key {config.label_key!r}")
    sample = tasks.metric_sample(len(cells.labels), config)
    methods, layouts = {}, {}
    for embedding in embeddings:
        say(f"evaluating {embedding.name} ({embedding.values.shape[1]} dimensions)")
        methods[embedding.name], layouts[embedding.name] = evaluate_embedding(
            embedding, cells, predictable, sample, config
        )
    results = {
        "transcriptformer_version": __version__,
        "data_file": config.data_file,
        "label_key": config.label_key,
        "settings": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("output_path", "overwrite")},
        "cells": len(cells.labels),
        "labels": cells.labels.value_counts().to_dict(),
        "cells_for_label_prediction": int(predictable.sum()),
        "methods": methods,
    }
    write_report(results, layouts, cells, output)
    return results


def check_output_path(config: EvaluateConfig) -> Path:
    """The report's folder, checked before anything is computed."""
    output = Path(config.output_path)
    if output.exists() and not output.is_dir():
        raise UserError(f"output_path {output} is a file; give a folder for the report")
    existing = [name for name in report.REPORT_FILES if (output / name).exists()]
    if existing and not config.overwrite:
        raise UserError(f"{output} already holds a report ({', '.join(existing)}); pass --overwrite or another folder")
    return output


def check_columns(cells: Cells, config: EvaluateConfig) -> Cells:
    """``cells``, once their label, batch and species columns are known to be usable (before any embedding)."""
    tasks.predictable_cells(cells.labels, config.min_class_size, f"label_key {config.label_key!r}")
    if cells.batches is not None:
        tasks.check_batches(cells.batches, f"batch_key {config.batch_key!r}")
    if cells.species is not None:
        tasks.check_batches(cells.species, f"species_key {config.species_key!r}")
    return cells


def evaluate_embedding(
    embedding: Embedding, cells: Cells, predictable: np.ndarray, sample: np.ndarray, config: EvaluateConfig
) -> tuple[dict[str, Any], np.ndarray]:
    """Every task on one embedding: its results, and its UMAP layout for the figure."""
    values = embedding.values
    labels = cells.labels.to_numpy()
    graph = tasks.neighbor_graph(values, config)
    result: dict[str, Any] = {
        "source": embedding.source,
        "dimensions": int(values.shape[1]),
        "label_prediction": tasks.label_prediction(values[predictable], cells.labels[predictable], config),
        "clustering": tasks.clustering(graph, labels, config.seed),
        "silhouette_label": tasks.label_silhouette(values[sample], labels[sample]),
    }
    if cells.batches is not None:
        result["batch_mixing"] = tasks.batch_mixing(values, labels, cells.batches.to_numpy(), sample, config)
    if cells.species is not None:
        result["cross_species"] = tasks.cross_species(values, cells.labels, cells.species, config)
    return result, tasks.umap_coordinates(graph, config.seed)


def write_report(results: dict[str, Any], layouts: dict[str, np.ndarray], cells: Cells, output: Path) -> None:
    """``results.json``, ``umap.png`` and ``metrics.png`` in ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    report.write_json(results, output)
    report.umap_figure(layouts, cells.labels, output / report.UMAP_FIGURE)
    report.metrics_figure(results, output / report.METRICS_FIGURE)
