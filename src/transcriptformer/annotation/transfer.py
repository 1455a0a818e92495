"""Label transfer: each query cell's label is the vote of its reference neighbours, weighted by similarity.

The weight of a neighbour at distance ``d``:

- cosine (``d = 1 - cosine similarity``): the cosine similarity ``1 - d``, or 0 for a neighbour pointing away;
- euclidean: ``1 / d``; where neighbours lie at distance 0, they alone vote, equally (scikit-learn's
  ``KNeighborsClassifier(weights="distance")``).

A cell's confidence is the winning label's share of the weights. Ties go to the first class in sorted order (as
scikit-learn's). A cell whose neighbours all weigh 0 falls back to an unweighted vote.
"""

from __future__ import annotations

import numpy as np

from transcriptformer.annotation.labels import LabelTable


def vote_weights(distances: np.ndarray, metric: str) -> np.ndarray:
    """The vote weight of each neighbour, ``(n_cells, k)``, from its distance (see the module's docstring)."""
    if metric == "cosine":
        return np.clip(1.0 - distances, 0.0, None)
    with np.errstate(divide="ignore"):
        weights = 1.0 / distances
    exact = distances == 0
    at_zero = exact.any(axis=1)
    weights[at_zero] = exact[at_zero]
    return weights


def class_sums(codes: np.ndarray, weights: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_cells, n_classes)``: per cell, the sum of its neighbours' weights by class; code -1 adds nothing."""
    rows = np.repeat(np.arange(len(codes)), codes.shape[1])
    flat = rows * n_classes + np.maximum(codes, 0).ravel()
    sums = np.bincount(flat, weights=np.where(codes >= 0, weights, 0.0).ravel(), minlength=len(codes) * n_classes)
    return sums.reshape(len(codes), n_classes)


def transfer_labels(
    neighbors: np.ndarray, distances: np.ndarray, table: LabelTable, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """The predicted class code and the confidence of each query cell, from its reference neighbours.

    Parameters
    ----------
    neighbors
        ``(n_cells, k)`` reference cell ids; -1 where the index found fewer than ``k``.
    distances
        ``(n_cells, k)`` their distances.
    table
        The reference's labels of one key.
    metric
        ``"cosine"`` or ``"euclidean"``.

    Returns
    -------
    codes, confidence
        ``(n_cells,)`` class codes into ``table.classes`` (-1: no neighbour has a label) and confidences in [0, 1].
    """
    codes = np.where(neighbors >= 0, table.codes[np.maximum(neighbors, 0)], -1)
    n_classes = len(table.classes)
    votes = class_sums(codes, vote_weights(distances, metric), n_classes)
    total = votes.sum(axis=1)
    unweighted = total <= 0
    votes[unweighted] = class_sums(codes[unweighted], np.ones(codes[unweighted].shape), n_classes)
    total = votes.sum(axis=1)
    predicted = np.where(total > 0, votes.argmax(axis=1), -1)
    confidence = np.divide(votes.max(axis=1), total, out=np.zeros(len(total)), where=total > 0)
    return predicted, confidence
