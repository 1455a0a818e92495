"""Figures of an annotation: reference and query in one UMAP, and the confusion matrix against true labels."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

N_UMAP_NEIGHBORS = 15


def joint_umap_figure(reference: np.ndarray, query: np.ndarray, labels: np.ndarray, metric: str) -> Figure:
    """One UMAP of reference (grey) and query cells (coloured by predicted label; NaN embeddings left out)."""
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    usable = np.isfinite(query).all(axis=1)
    query, labels = query[usable], pd.Series(labels[usable]).astype(str).to_numpy()
    cells = ad.AnnData(np.concatenate([reference, query]).astype(np.float32))
    sc.pp.neighbors(cells, n_neighbors=min(N_UMAP_NEIGHBORS, cells.n_obs - 1), use_rep="X", metric=metric)
    sc.tl.umap(cells, random_state=0)
    coordinates = cells.obsm["X_umap"]
    figure, axes = plt.subplots(figsize=(7, 6))
    axes.scatter(*coordinates[: len(reference)].T, s=3, c="lightgrey", label="reference", rasterized=True)
    on_query = coordinates[len(reference) :]
    for label in sorted(set(labels)):
        chosen = labels == label
        axes.scatter(*on_query[chosen].T, s=5, label=f"{label} ({chosen.sum()})", rasterized=True)
    axes.set(xlabel="UMAP 1", ylabel="UMAP 2", xticks=[], yticks=[], title="query cells by predicted label")
    axes.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    plt.close(figure)
    return figure


def confusion_figure(truth: pd.Series, predicted: pd.Series) -> Figure:
    """The confusion matrix of the predictions (columns, Unknown included) against true labels (rows), row shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    scored = truth.notna().to_numpy() & predicted.notna().to_numpy()
    truth, predicted = truth[scored].astype(str).to_numpy(), predicted[scored].astype(str).to_numpy()
    rows = np.unique(truth)
    columns = np.unique(predicted)
    labels = np.union1d(rows, columns)
    counts = confusion_matrix(truth, predicted, labels=labels)
    counts = counts[np.isin(labels, rows)][:, np.isin(labels, columns)]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2 + 0.35 * max(len(rows), len(columns))
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
    axes.set_yticks(range(len(rows)), rows, fontsize=7)
    axes.set(xlabel="predicted", ylabel="true", title="share of each true label")
    figure.colorbar(image, ax=axes, shrink=0.7)
    plt.close(figure)
    return figure
