"""Length-aware batching: group cells of similar length so that little compute goes to padding.

Within each window of consecutive cells, cells are sorted by token count (longest first) and cut into batches
of a fixed number of cells or of a token budget. Each batch is trimmed to one position past its longest cell
(that position's shifted input is the cell's last gene, which counts in the cell embedding), rounded up to a
multiple that the attention backend prefers. Outputs are written back by cell index, so the input order is
kept; padding never changes a result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlannedBatch:
    """Cells of one forward pass and the sequence length they are trimmed to.

    Attributes
    ----------
    rows : ndarray
        Cell indices (within the planned block), longest cell first.
    length : int
        Number of gene positions of the batch.
    """

    rows: np.ndarray
    length: int


def batch_length(longest: int, seq_len: int, multiple: int = 1) -> int:
    """Positions needed for cells of at most ``longest`` tokens: one more, rounded up, at most ``seq_len``."""
    needed = min(longest + 1, seq_len)
    return min(seq_len, -(-needed // multiple) * multiple)


def plan_batches(
    n_tokens: np.ndarray,
    seq_len: int,
    *,
    batch_size: int | None = 8,
    max_tokens: int | None = None,
    window: int = 4096,
    multiple: int = 1,
) -> list[PlannedBatch]:
    """Group cells into batches of similar length.

    Parameters
    ----------
    n_tokens
        ``(n_cells,)`` number of unpadded positions of each cell.
    seq_len
        The model's sequence length (upper bound of every batch's length).
    batch_size
        Cells per batch; ignored when ``max_tokens`` is given.
    max_tokens
        Token budget per batch: cells x batch length stays within it (a single cell longer than the budget
        still gets a batch of its own).
    window
        Cells are sorted by length within consecutive windows of this many cells, which bounds how far a
        cell's batch can be from its input position.
    multiple
        Batch lengths are rounded up to a multiple of this (e.g. the flex-attention block size).

    Returns
    -------
    list of PlannedBatch
        Covering every cell exactly once.
    """
    if max_tokens is None and (batch_size is None or batch_size < 1):
        raise ValueError(f"batch_size must be >= 1 (or give max_tokens), got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    n_tokens = np.asarray(n_tokens, dtype=np.int64)
    batches: list[PlannedBatch] = []
    for start in range(0, len(n_tokens), window):
        order = start + np.argsort(-n_tokens[start : start + window], kind="stable")
        batches.extend(_cut(order, n_tokens, seq_len, batch_size, max_tokens, multiple))
    return batches


def _cut(
    order: np.ndarray, n_tokens: np.ndarray, seq_len: int, batch_size: int | None, max_tokens: int | None, multiple: int
) -> list[PlannedBatch]:
    """Cut cells sorted longest first into consecutive batches."""
    batches = []
    first = 0
    while first < len(order):
        length = batch_length(int(n_tokens[order[first]]), seq_len, multiple)
        count = batch_size if max_tokens is None else max(1, max_tokens // length)
        rows = order[first : first + count]
        batches.append(PlannedBatch(rows=rows, length=length))
        first += len(rows)
    return batches
