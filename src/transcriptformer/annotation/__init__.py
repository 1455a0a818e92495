"""Annotation of new cells from a labelled reference: neighbour votes in a FAISS vector index, with Unknown.

:func:`annotate` transfers labels between two sets of embeddings in one call; :class:`ReferenceIndex` builds an
index once, saves it and labels query cells with it batch by batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from transcriptformer.annotation.index import Calibration, ReferenceIndex
from transcriptformer.annotation.labels import Labels, LabelTable
from transcriptformer.annotation.settings import METRICS, UNKNOWN, AnnotateConfig
from transcriptformer.annotation.summary import summarize

__all__ = [
    "METRICS",
    "UNKNOWN",
    "AnnotateConfig",
    "Calibration",
    "LabelTable",
    "ReferenceIndex",
    "annotate",
    "summarize",
]


def annotate(
    query_embeddings: Any,
    reference_embeddings: Any,
    labels: Labels,
    label_keys: str | Sequence[str] | None = None,
    *,
    n_neighbors: int = AnnotateConfig.n_neighbors,
    metric: str = AnnotateConfig.metric,
    reject: bool = AnnotateConfig.reject,
    false_unknown_rate: float = AnnotateConfig.false_unknown_rate,
    seed: int = AnnotateConfig.seed,
) -> pd.DataFrame:
    """Label query cells by the weighted vote of their nearest labelled reference cells, with ``"Unknown"``.

    The reference is put in a FAISS index (exact search up to ``AnnotateConfig.exact_max_cells`` cells,
    approximate above); each query cell takes the label that its ``n_neighbors`` nearest reference cells vote for,
    each weighted by its similarity (cosine similarity, or inverse Euclidean distance), and the winning label's share
    of the weights as its confidence. A cell whose confidence is below the threshold chosen on the reference is
    called ``"Unknown"``: reference cells are held out, labelled by the rest, and the threshold is the
    ``false_unknown_rate`` quantile of the confidences of those labelled correctly.

    Parameters
    ----------
    query_embeddings
        ``(n_query, dimension)`` embeddings of the cells to label.
    reference_embeddings
        ``(n_reference, dimension)`` embeddings of the labelled cells, from the same model.
    labels
        The reference's labels: a table (e.g. ``reference.obs``), a mapping of key to values, or one column.
    label_keys
        The columns of ``labels`` to transfer (one or several); ``None``: every column (or the one given).
    n_neighbors
        Reference cells voting for each query cell.
    metric
        ``"cosine"`` or ``"euclidean"``.
    reject
        Call ``"Unknown"`` the cells below the threshold; ``False``: every cell gets its vote's winner.
    false_unknown_rate
        The share of held-out, correctly labelled reference cells that the threshold calls Unknown.
    seed
        Seed of the held-out reference cells.

    Returns
    -------
    DataFrame
        One row per query cell: ``predicted_<key>`` (categorical) and ``<key>_confidence`` for each label key.

    Examples
    --------
    >>> predictions = transcriptformer.annotate(query.obsm["X_pca"], reference.obsm["X_pca"], reference.obs,
    ...                                         "cell_type")  # doctest: +SKIP
    >>> query.obs = query.obs.join(predictions.set_index(query.obs_names))  # doctest: +SKIP
    """
    settings = AnnotateConfig(
        n_neighbors=n_neighbors, metric=metric, reject=reject, false_unknown_rate=false_unknown_rate, seed=seed
    )
    return ReferenceIndex.build(reference_embeddings, labels, label_keys, settings=settings).annotate(query_embeddings)
