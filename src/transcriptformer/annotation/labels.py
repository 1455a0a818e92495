"""The reference's labels: one or several label keys, read from a table, checked, encoded as class codes."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from transcriptformer.annotation.settings import UNKNOWN
from transcriptformer.errors import UserError

# Classes with fewer reference cells than this are named in a warning: they can rarely win a neighbour vote.
SMALL_CLASS_CELLS = 3
NAMED_CLASSES = 5  # at most this many classes named in a warning line

Labels = pd.DataFrame | pd.Series | Mapping[str, Sequence] | np.ndarray | Sequence


@dataclass
class LabelTable:
    """The labels of one key: the sorted class names and each reference cell's class code (-1: no label)."""

    key: str
    classes: np.ndarray  # (n_classes,) str
    codes: np.ndarray  # (n_cells,) int32


def label_columns(labels: Labels, label_keys: str | Sequence[str] | None, n_cells: int) -> dict[str, pd.Series]:
    """The label columns to transfer, by key, each of ``n_cells`` values in reference order.

    ``labels`` is a table (e.g. the reference's ``obs``) with ``label_keys`` naming its columns, a mapping of key to
    values, or one column of values (a Series keeps its name as the key, else ``"label"``).
    """
    if isinstance(label_keys, str):
        label_keys = [label_keys]
    if isinstance(labels, pd.DataFrame | Mapping):
        available = list(labels.keys())
        keys = list(label_keys) if label_keys is not None else available
        missing = [key for key in keys if key not in available]
        if missing or not keys:
            raise UserError(
                f"label key {', '.join(map(repr, missing)) or '(none given)'} not in the reference labels; "
                f"choose among: {', '.join(map(str, available[:20])) or 'no columns'}"
            )
        columns = {str(key): pd.Series(np.asarray(labels[key], dtype=object)) for key in keys}
    else:
        name = labels.name if isinstance(labels, pd.Series) and labels.name is not None else "label"
        keys = list(label_keys) if label_keys is not None else [name]
        if len(keys) != 1:
            raise UserError(f"one column of labels was given for {len(keys)} label keys; give a table, a column each")
        columns = {str(keys[0]): pd.Series(np.asarray(labels, dtype=object))}
    for key, column in columns.items():
        if not key.strip() or "/" in key:
            raise UserError(
                f"label key {key!r} cannot name the output columns predicted_<key> and <key>_confidence (an empty name "
                "or one with '/', which .h5ad files cannot hold); copy the labels to a column of a plain name"
            )
        if len(column) != n_cells:
            raise UserError(f"label key {key!r} has {len(column)} values for {n_cells} reference cells; give one each")
    return columns


def encode_labels(key: str, column: pd.Series) -> LabelTable:
    """Class codes of one label column; missing values (NaN, None, empty) are -1 and do not vote.

    Raises a ``UserError`` when every value is missing or a class is named ``"Unknown"`` (the name of rejected
    cells); warns when some cells have no label or a class has fewer than ``SMALL_CLASS_CELLS`` cells.
    """
    if column.empty:
        raise UserError(f"label key {key!r}: the reference holds no cells; give a reference with labelled cells")
    missing = column.isna().to_numpy() | (column.astype(str).str.strip() == "").to_numpy()
    if missing.all():
        raise UserError(f"label key {key!r}: every reference cell's label is missing; choose a column with labels")
    values = column[~missing].astype(str)
    if (values == UNKNOWN).any():
        raise UserError(
            f"label key {key!r}: {int((values == UNKNOWN).sum())} reference cells are labelled {UNKNOWN!r}, the name "
            "given to rejected cells; rename that class or leave those cells out of the reference"
        )
    classes, codes = np.unique(values.to_numpy(dtype=str), return_inverse=True)
    all_codes = np.full(len(column), -1, dtype=np.int32)
    all_codes[~missing] = codes
    if missing.any():
        warnings.warn(
            f"label key {key!r}: {int(missing.sum())} of {len(column)} reference cells have no label and do not vote",
            stacklevel=3,
        )
    _warn_small_classes(key, classes, np.bincount(codes, minlength=len(classes)))
    return LabelTable(key=key, classes=classes, codes=all_codes)


def _warn_small_classes(key: str, classes: np.ndarray, counts: np.ndarray) -> None:
    small = np.flatnonzero(counts < SMALL_CLASS_CELLS)
    if not len(small):
        return
    small = small[np.argsort(counts[small], kind="stable")]
    named = ", ".join(
        f"{str(classes[i])!r} ({counts[i]} cell{'s' if counts[i] > 1 else ''})" for i in small[:NAMED_CLASSES]
    )
    more = f" and {len(small) - NAMED_CLASSES} more" if len(small) > NAMED_CLASSES else ""
    warnings.warn(
        f"label key {key!r}: {len(small)} reference classes have fewer than {SMALL_CLASS_CELLS} cells and are rarely "
        f"predicted: {named}{more}",
        stacklevel=3,
    )
