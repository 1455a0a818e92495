"""An evaluation from settings to report: read the cells, gather the embeddings, run every task on each.

The report folder is written as one unit: its files go to a temporary folder beside it (``results.json`` last),
which is then renamed into place, so that a run killed at any point leaves either the previous report or none. A run
holds the output's lock (``.<folder>.lock`` beside it) from its start, so that two runs never write one report.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from transcriptformer.console import say
from transcriptformer.engine.output import hold_output
from transcriptformer.errors import UserError, first_few
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

PARTIAL_SUFFIX = ".partial"  # .<folder>.<pid>.partial: a report being written
REPLACED_SUFFIX = ".replaced"  # .<folder>.<pid>.replaced: the previous report, while the new one takes its place


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate every embedding of ``config`` on its cells; write the report; return the results (as the JSON).

    Raises
    ------
    UserError, KeyError, ValueError
        For a missing column, a label column with fewer than two classes of ``min_class_size`` cells, a batch or
        species column with a single value, an output folder that already holds a report (without ``overwrite``)
        or other files, or one that another run is writing.
    """
    output = check_output_path(config)
    with hold_output(output, ("output_path",)):
        recover_killed_runs(output)
        check_output_path(config)  # again: a run that ended while this one waited may have written it
        return evaluate_into(output, config)


def evaluate_into(output: Path, config: EvaluateConfig) -> dict[str, Any]:
    """The evaluation of :func:`evaluate`, its report written to ``output`` (whose lock the caller holds)."""
    use_cpu_threads()  # torch's threads for the checkpoints: the idle CPUs
    cells = check_columns(read_cells(config), config)
    embeddings, skipped = gather_embeddings(cells, config)
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
        if embedding.perturbation is not None:
            methods[embedding.name]["perturbation_expression_prediction"] = embedding.perturbation
    results = {
        "transcriptformer_version": __version__,
        "data_file": config.data_file,
        "label_key": config.label_key,
        "settings": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("output_path", "overwrite")},
        "cells": len(cells.labels),
        "labels": cells.labels.value_counts().to_dict(),
        "cells_for_label_prediction": int(predictable.sum()),
        "methods": methods,
        "skipped_baselines": skipped,
    }
    write_report(results, layouts, cells, embeddings if config.save_embeddings else [], output)
    return results


def check_output_path(config: EvaluateConfig) -> Path:
    """The report's folder (absolute), checked before anything is computed.

    The folder is the report's own: it is replaced as a whole, so it may hold a report and nothing else.
    """
    output = Path(os.path.abspath(config.output_path))
    if output.exists() and not output.is_dir():
        raise UserError(f"output_path {output} is a file; give a folder for the report")
    if output == Path.cwd() or output in Path.cwd().parents:
        raise UserError(
            f"output_path {output} holds the working folder; give a folder of its own, e.g. ./evaluate_results"
        )
    if not output.is_dir():
        return output
    others = sorted(path.name for path in output.iterdir() if path.name not in report.ALL_REPORT_FILES)
    if others:
        raise UserError(
            f"output_path {output} holds files that are not an evaluation report ({first_few(others)}); give a new or "
            "empty folder: the report folder is replaced as a whole"
        )
    existing = [name for name in report.ALL_REPORT_FILES if (output / name).exists()]
    if existing and not config.overwrite:
        raise UserError(
            f"{output} already holds a report ({', '.join(existing)}); pass `overwrite=True` or another folder"
        )
    return output


def recover_killed_runs(output: Path) -> None:
    """Undo what runs killed while writing ``output`` left beside it; call it only while holding the output.

    A report being written is removed; a previous report moved aside while the new one took its place comes back
    when there is no report (the run was killed between the two renames), and is removed otherwise.
    """
    prefix = f".{output.name}."
    for leftover in sorted(output.parent.iterdir()):
        pid, _, suffix = leftover.name.removeprefix(prefix).partition(".")
        if not (leftover.name.startswith(prefix) and pid.isdigit() and leftover.is_dir()):
            continue
        if f".{suffix}" == REPLACED_SUFFIX and not output.exists():
            leftover.rename(output)
        elif f".{suffix}" in (PARTIAL_SUFFIX, REPLACED_SUFFIX):
            shutil.rmtree(leftover)


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
        **({"baseline": embedding.baseline} if embedding.baseline else {}),
        "dimensions": int(values.shape[1]),
        "label_prediction": tasks.label_prediction(values[predictable], cells.labels[predictable], config),
        "clustering": tasks.clustering(graph, labels, config.seed),
        "silhouette_label": tasks.label_silhouette(values[sample], labels[sample]),
    }
    if cells.batches is not None:
        result["batch_mixing"] = tasks.batch_mixing(values, labels, cells.batches.to_numpy(), sample, config)
    if cells.species is not None:
        species = cells.species.to_numpy()
        result["cross_species_integration"] = tasks.batch_mixing(values, labels, species, sample, config)
        result["cross_species_label_prediction"] = tasks.cross_species_label_prediction(
            values, cells.labels, cells.species, cells.samples, config
        )
    if cells.times is not None:
        result["sequential_organisation"] = tasks.sequential_organisation(values, cells.times.to_numpy(), config)
    return result, tasks.umap_coordinates(graph, config.seed)


def write_report(
    results: dict[str, Any], layouts: dict[str, np.ndarray], cells: Cells, embeddings: list[Embedding], output: Path
) -> None:
    """The report's files in a temporary folder (``results.json`` last), then renamed to ``output``.

    ``umap.png``, ``metrics.png``, ``embeddings.h5ad`` when ``embeddings`` are given, ``results.json``. A report
    already there is moved aside first and removed once the new one is in place.
    """
    temporary = output.with_name(f".{output.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    temporary.mkdir()
    if embeddings:
        report.write_embeddings(cells.adata.obs, embeddings, temporary)
    report.umap_figure(layouts, cells.labels, temporary / report.UMAP_FIGURE)
    report.metrics_figure(results, temporary / report.METRICS_FIGURE)
    report.write_json(results, temporary)
    if not output.exists():
        temporary.rename(output)
        return
    replaced = output.with_name(f".{output.name}.{os.getpid()}{REPLACED_SUFFIX}")
    output.rename(replaced)
    temporary.rename(output)
    shutil.rmtree(replaced)
