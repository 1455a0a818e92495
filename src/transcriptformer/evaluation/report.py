"""The report of an evaluation: a table on the terminal, ``results.json`` and two PNG figures.

``results.json`` holds every number, each fold's included; the table and the bar chart show the summary of
:func:`summary`: means over folds (with their standard deviation in the chart).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from transcriptformer.evaluation.embeddings import Embedding
from transcriptformer.evaluation.tasks import SCORES

RESULTS_FILE = "results.json"
UMAP_FIGURE = "umap.png"
METRICS_FIGURE = "metrics.png"
EMBEDDINGS_FILE = "embeddings.h5ad"  # with save_embeddings
REPORT_FILES = (RESULTS_FILE, UMAP_FIGURE, METRICS_FIGURE)
ALL_REPORT_FILES = (*REPORT_FILES, EMBEDDINGS_FILE)
BATCH_METRICS = {"entropy": "batch entropy", "batch_silhouette": "batch silhouette"}
SPECIES_METRICS = {"entropy": "species entropy", "batch_silhouette": "species silhouette"}
SEQUENTIAL_METRICS = {"silhouette_time": "time silhouette", "sequential_alignment": "sequential alignment"}


def summary(method: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """One method's headline numbers: ``row name -> (value, spread over folds, 0 when there are no folds)``."""
    rows = {}
    for classifier, scores in method["label_prediction"].items():
        for score in SCORES:
            rows[f"{classifier} {score}"] = (float(np.mean(scores[score])), float(np.std(scores[score])))
    rows["Leiden ARI"] = (method["clustering"]["ari"], 0.0)
    rows["Leiden NMI"] = (method["clustering"]["nmi"], 0.0)
    rows["label silhouette"] = (method["silhouette_label"], 0.0)
    for task, names in (
        ("batch_mixing", BATCH_METRICS),
        ("cross_species_integration", SPECIES_METRICS),
        ("sequential_organisation", SEQUENTIAL_METRICS),
    ):
        for key, name in names.items():
            if task in method:
                rows[name] = (method[task][key], 0.0)
    if "perturbation_expression_prediction" in method:  # a checkpoint's perturb predictions
        per_condition = [c["spearman"] for c in method["perturbation_expression_prediction"]["conditions"].values()]
        rows["perturbation spearman"] = (float(np.mean(per_condition)), float(np.std(per_condition)))
    transfers: dict[str, list[float]] = {}
    for transfer in method.get("cross_species_label_prediction", []):  # a species with itself: one row per fold
        transfers.setdefault(f"{transfer['train']}->{transfer['test']} {transfer['classifier']} f1", []).append(
            transfer["f1"]
        )
    for row, values in transfers.items():
        rows[row] = (float(np.mean(values)), float(np.std(values)))
    return rows


def table(results: dict[str, Any]) -> pd.DataFrame:
    """Rows: metrics; columns: methods."""
    return pd.DataFrame(
        {
            name: {row: value for row, (value, _) in summary(method).items()}
            for name, method in results["methods"].items()
        }
    )


def format_table(results: dict[str, Any]) -> str:
    """The table as the terminal shows it (three decimals)."""
    return table(results).to_string(float_format=lambda value: f"{value:.3f}", na_rep="-")


def write_json(results: dict[str, Any], folder: Path) -> Path:
    """``results.json``: the settings, the cells and every method's numbers."""
    path = folder / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def write_embeddings(obs: pd.DataFrame, embeddings: list[Embedding], folder: Path) -> Path:
    """``embeddings.h5ad``: the evaluated cells (their ``obs``, no genes), every method's embedding in ``obsm``."""
    path = folder / EMBEDDINGS_FILE
    cells = ad.AnnData(obs=obs.copy(), obsm={embedding.name: embedding.values for embedding in embeddings})
    cells.write_h5ad(path)
    return path


def umap_figure(layouts: dict[str, np.ndarray], labels: pd.Series, path: Path) -> None:
    """One UMAP panel per method, cells coloured by label (the largest classes first in the legend)."""
    order = labels.value_counts().index
    codes = pd.Categorical(labels, categories=order).codes
    colors = label_colors(len(order))
    columns = min(3, len(layouts))
    rows = -(-len(layouts) // columns)
    figure = Figure(figsize=(4.5 * columns + 3, 4.5 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for ax, (name, layout) in zip(axes, layouts.items(), strict=False):
        ax.scatter(layout[:, 0], layout[:, 1], c=colors[codes], s=max(1.0, 3000 / len(labels)), linewidths=0)
        ax.set(title=name, xticks=[], yticks=[], xlabel="UMAP 1", ylabel="UMAP 2")
    for ax in axes[len(layouts) :]:
        ax.set_axis_off()
    handles = [axes[0].scatter([], [], color=colors[i], label=str(name)) for i, name in enumerate(order[:30])]
    figure.legend(handles=handles, loc="outside right center", fontsize="small", frameon=False)
    figure.savefig(path, dpi=100)


def label_colors(n: int) -> np.ndarray:
    """``n`` distinct RGBA colours: tab20's when they suffice, else evenly spaced over turbo."""
    from matplotlib import colormaps

    return colormaps["tab20"](np.arange(n)) if n <= 20 else colormaps["turbo"](np.linspace(0, 1, n))


def metrics_figure(results: dict[str, Any], path: Path) -> None:
    """Grouped bars of each metric (F1 and AUROC of every classifier, clustering, silhouettes) per method.

    The error bars are the standard deviation over folds.
    """
    summaries = {name: summary(method) for name, method in results["methods"].items()}
    left_out = ("accuracy", "precision", "recall")  # in the table and results.json
    metrics = [row for row in next(iter(summaries.values())) if not row.endswith(left_out) and "->" not in row]
    width = 0.8 / len(summaries)
    figure = Figure(figsize=(max(8, 0.9 * len(metrics) + 2), 4.5), layout="constrained")
    ax = figure.subplots()
    positions = np.arange(len(metrics))
    for i, (name, rows) in enumerate(summaries.items()):
        values = [rows.get(metric, (np.nan, 0.0)) for metric in metrics]  # a row of checkpoints alone: NaN
        ax.bar(positions + i * width, [v for v, _ in values], width, yerr=[s for _, s in values], label=name, capsize=2)
    ax.set_xticks(positions + width * (len(summaries) - 1) / 2, metrics, rotation=45, ha="right")
    ax.set(ylim=(0, 1), ylabel="score (1 is best)", title=f"{Path(results['data_file']).name}: {results['label_key']}")
    figure.legend(loc="outside upper center", fontsize="small", ncols=min(5, len(summaries)), frameon=False)
    figure.savefig(path, dpi=100)
