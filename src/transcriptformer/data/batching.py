"""Length-aware batching: group cells of similar length so that little compute goes to padding.

Within each window of consecutive cells, cells are sorted by token count (longest first) and cut into batches
of at most a fixed number of cells or a token budget. A batch also ends where the next cell would make it spend
more than ``max_padding`` of its positions on padding: computing padded positions costs as much as computing
genes (every linear layer and norm runs on them, and attention rows too), while on the CPU a batch of one long
cell computes about as fast per position as a batch of several. Each batch is trimmed to one position past its
longest cell (that position's shifted input is the cell's last gene, which counts in the cell embedding), rounded
up to a multiple that the attention backend prefers. Outputs are written back by cell index, so the input order
is kept; padding never changes a result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Share of a batch's positions that may go to padding its shorter cells to its longest one (padding that a cell
# would have alone, from rounding to the backend's length multiple, is not counted). Measured on 16 real human cells
# of a 6-layer model on the CPU (benchmarks/README.md): 0.05 gave the least CPU time of 0 to 0.3 and no limit.
MAX_PADDING = 0.05


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


def batch_length(longest: int | np.ndarray, seq_len: int, multiple: int = 1) -> int | np.ndarray:
    """Positions needed for cells of at most ``longest`` tokens: one more, rounded up, at most ``seq_len``.

    Element-wise for an array of lengths (the length of each cell's batch if it were alone).
    """
    needed = np.minimum(np.asarray(longest) + 1, seq_len)
    length = np.minimum(seq_len, -(-needed // multiple) * multiple)
    return int(length) if length.ndim == 0 else length


def plan_batches(
    n_tokens: np.ndarray,
    seq_len: int,
    *,
    batch_size: int | None = 8,
    max_tokens: int | None = None,
    window: int = 4096,
    multiple: int = 1,
    max_padding: float = MAX_PADDING,
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
    max_padding
        A batch takes its next (shorter) cell only while the padding that batching adds (positions beyond the
        length each cell's batch would have alone) stays at most this share of the batch's positions; 1 puts no
        limit.

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
    if not 0 <= max_padding <= 1:
        raise ValueError(f"max_padding must be within [0, 1], got {max_padding}")
    n_tokens = np.asarray(n_tokens, dtype=np.int64)
    alone = batch_length(n_tokens, seq_len, multiple)  # the length of each cell's batch if it were alone
    batches: list[PlannedBatch] = []
    for start in range(0, len(n_tokens), window):
        order = start + np.argsort(-n_tokens[start : start + window], kind="stable")
        batches.extend(_cut(order, alone, batch_size, max_tokens, max_padding))
    return batches


def _cut(
    order: np.ndarray, alone: np.ndarray, batch_size: int | None, max_tokens: int | None, max_padding: float
) -> list[PlannedBatch]:
    """Cut cells sorted longest first into consecutive batches (``alone``: the length of each cell's batch alone)."""
    batches = []
    first = 0
    while first < len(order):
        length = int(alone[order[first]])
        count = batch_size if max_tokens is None else max(1, max_tokens // length)
        rows = order[first : first + count]
        rows = rows[: _cells_within_padding(alone[rows], max_padding)]
        batches.append(PlannedBatch(rows=rows, length=length))
        first += len(rows)
    return batches


def _cells_within_padding(alone: np.ndarray, max_padding: float) -> int:
    """How many of the cells (longest first) a batch takes: as many as keep its padding within ``max_padding``.

    The padding counted is what the batch adds to its cells: the positions from the length each would have alone
    (``alone``) to the batch's length, that of its first cell.
    """
    padding = 1 - np.cumsum(alone) / (alone[0] * np.arange(1, len(alone) + 1))
    return max(1, int(np.count_nonzero(padding <= max_padding)))
