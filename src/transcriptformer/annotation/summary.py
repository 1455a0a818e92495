"""What an annotation found: per label key, the cells per predicted label and the share called Unknown."""

from __future__ import annotations

import pandas as pd

from transcriptformer.annotation.settings import UNKNOWN

PREDICTED = "predicted_"


def summarize(predictions: pd.DataFrame) -> dict[str, dict]:
    """Per label key of ``predictions`` (as :meth:`ReferenceIndex.annotate` returns them), a JSON-ready summary.

    Returns
    -------
    dict
        ``{key: {"cells", "labelled", "unknown", "unknown_rate", "mean_confidence", "counts"}}``: query cells,
        cells with a label (not NaN), cells called Unknown and their share of the labelled ones, the mean
        confidence of the labelled cells, and the cells per predicted label (most first, Unknown included).
    """
    summary = {}
    for column in predictions.columns:
        if not column.startswith(PREDICTED):
            continue
        key = column.removeprefix(PREDICTED)
        labels = predictions[column]
        labelled = int(labels.notna().sum())
        unknown = int((labels == UNKNOWN).sum())
        counts = labels.value_counts()
        summary[key] = {
            "cells": len(labels),
            "labelled": labelled,
            "unknown": unknown,
            "unknown_rate": unknown / labelled if labelled else 0.0,
            "mean_confidence": float(predictions[f"{key}_confidence"].mean()) if labelled else float("nan"),
            "counts": {str(label): int(count) for label, count in counts[counts > 0].items()},
        }
    return summary
