"""The one batch loop: from tokenized cells to model outputs, for every use of a model.

::

    plan      cells of similar length are grouped into batches   (transcriptformer.data.batching)
    batch     the padded inputs of each batch are built           (TokenizedCells.batch)
    predict   the model computes the requested outputs            (no gradients, the run's precision)
    check     cells without any count get NaN outputs; any other  (check_batch)
              NaN or infinite output stops the run
    map       outputs go back to their cells, per position         (predict_positions)
              or per gene on a gene axis                          (predict_gene_outputs, GeneOutputs)

The Python API and ``transcriptformer inference`` both run cells through here. A model is anything with the
prediction interface of :class:`Predictor`: :class:`~transcriptformer.model.transcriptformer.TranscriptFormer`
or the :class:`~transcriptformer.model.esm2ce.ESM2CellEmbedding` baseline. What each output is and which
positions it scores is declared in :mod:`transcriptformer.model.outputs`.

A cell's outputs depend on the cell alone: not on its batch mates, the batch size or the token budget. So when a
batch runs out of device memory, the loop halves the batch size (or token budget) for the rest of the run, warns
once with the new value, and runs the cells of that batch again (:class:`MemoryLimit`).
A cell without any count among the genes read has no meaningful output: all of its outputs are NaN.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from transcriptformer.config import PredictConfig
from transcriptformer.data.batching import PlannedBatch, plan_batches
from transcriptformer.data.tokenize import Batch, TokenizedCells
from transcriptformer.errors import UserError
from transcriptformer.model.outputs import OUTPUTS, gene_positions
from transcriptformer.model.transcriptformer import SpecialTokens
from transcriptformer.runtime import autocast, resolve_precision

# Model inputs returned beside the outputs by predict_positions: which gene each position holds, its count, and
# the aux tokens.
INPUT_ARRAYS = ("gene_token_indices", "gene_counts", "aux_token_indices")


class NonFiniteOutputError(UserError, RuntimeError):
    """The model computed NaN or infinite outputs (or was given NaN or infinite inputs) for cells with counts."""


class Predictor(Protocol):
    """What the batch loop needs of a model."""

    special_tokens: SpecialTokens
    seq_len: int
    output_keys: tuple[str, ...]

    def length_multiple(self, device: torch.device) -> int:
        """Multiple that batch lengths are rounded up to on ``device``."""

    def predict(
        self, gene_tokens: Tensor, gene_counts: Tensor, aux_tokens: Tensor | None, output_keys: Collection[str]
    ) -> dict[str, Tensor]:
        """The requested outputs of one batch."""


@dataclass
class PredictedBatch:
    """One forward pass: its cells, their inputs (on the CPU, trimmed to the batch length) and their outputs.

    Attributes
    ----------
    rows : ndarray
        Indices of the batch's cells in the tokenized block.
    inputs : Batch
        ``(B, L)`` gene tokens and counts, ``(B, A)`` aux tokens.
    outputs : dict of str to ndarray
        float32 outputs: ``(B, ...)`` per cell, ``(B, L, ...)`` per gene position.
    """

    rows: np.ndarray
    inputs: Batch
    outputs: dict[str, np.ndarray]


@dataclass
class MemoryLimit:
    """The largest forward pass that fits in the device's memory, learned from out-of-memory errors.

    The batch loop lowers it when a batch runs out of memory. Pass one limit to every call of a run to keep the
    lowered size for the rest of the run (``transcriptformer inference`` does).

    Attributes
    ----------
    batch_size : int or None
        Cells per forward pass at most, when the settings give a batch size; None: not lowered.
    max_tokens : int or None
        Tokens per forward pass at most, when the settings give a token budget; None: not lowered.
    """

    batch_size: int | None = None
    max_tokens: int | None = None

    def applied_to(self, settings: PredictConfig) -> PredictConfig:
        """``settings`` with their batch size, or their token budget when they give one, lowered to this limit."""
        if settings.max_tokens is None:
            return replace(settings, batch_size=min(settings.batch_size, self.batch_size or settings.batch_size))
        return replace(settings, max_tokens=min(settings.max_tokens, self.max_tokens or settings.max_tokens))

    def lower(self, failed: PlannedBatch, settings: PredictConfig) -> str:
        """Halve the size of ``failed``, a batch of several cells that ran out of memory; returns what changed."""
        cells, length = len(failed.rows), failed.length
        if settings.max_tokens is None:
            self.batch_size = cells // 2
            new_size = f"`batch_size={self.batch_size}`"
        else:
            self.max_tokens = cells * length // 2
            new_size = f"`max_tokens={self.max_tokens}`"
        return (
            f"out of memory in a batch of {cells} cells x {length} positions; continuing with {new_size} for the "
            f"rest of the run (results do not depend on it; pass {new_size} to start there)"
        )


def plan(
    model: Predictor,
    cells: TokenizedCells,
    settings: PredictConfig,
    device: torch.device,
    rows: np.ndarray | None = None,
) -> list[PlannedBatch]:
    """The length-aware batches that ``cells`` (or the cells ``rows`` of them) run in.

    See :func:`~transcriptformer.data.batching.plan_batches`.
    """
    rows = np.arange(len(cells)) if rows is None else rows
    planned = plan_batches(
        cells.n_tokens()[rows],
        cells.seq_len,
        batch_size=settings.batch_size,
        max_tokens=settings.max_tokens,
        multiple=model.length_multiple(device),
    )
    return [PlannedBatch(rows[batch.rows], batch.length) for batch in planned]


def predict_batches(
    model: Predictor,
    cells: TokenizedCells,
    settings: PredictConfig,
    device: torch.device,
    limit: MemoryLimit | None = None,
) -> Iterator[PredictedBatch]:
    """Run ``cells`` through ``model`` batch by batch, in the order of :func:`plan`.

    The model checks the output keys (and computes without gradients); this loop adds the run's precision and
    checks every batch (:func:`check_batch`). A batch that runs out of device memory lowers ``limit`` (a new one
    when not given), and the cells not yet done are planned again under it, that batch's first; a single cell that
    does not fit raises a :class:`UserError`.

    Raises
    ------
    NonFiniteOutputError
        When a cell with counts has NaN or infinite inputs or outputs.
    """
    limit = MemoryLimit() if limit is None else limit
    precision = resolve_precision(settings.precision, device)
    pending = deque(plan(model, cells, limit.applied_to(settings), device))
    while pending:
        planned = pending.popleft()
        inputs = cells.batch(planned.rows, planned.length)
        try:
            outputs = _predict(model, inputs, settings, device, precision)
        except torch.OutOfMemoryError as error:  # torch.cuda.OutOfMemoryError is this class
            if len(planned.rows) == 1:
                raise UserError(
                    f"out of memory on {device} with a single cell of {planned.length} positions: free memory on the "
                    "device (other processes), use one with more memory, or run on the CPU with `device=cpu`"
                ) from error
            warnings.warn(limit.lower(planned, settings), stacklevel=2)
            not_done = np.concatenate([planned.rows, *(batch.rows for batch in pending)])
            pending = deque(plan(model, cells, limit.applied_to(settings), device, not_done))
            continue
        batch = PredictedBatch(planned.rows, inputs, outputs)
        check_batch(batch, cells, precision)
        yield batch


def _predict(
    model: Predictor, inputs: Batch, settings: PredictConfig, device: torch.device, precision: str
) -> dict[str, np.ndarray]:
    """One forward pass of ``inputs`` on ``device``; float32 outputs on the CPU."""
    on_device = inputs.to(device)
    with autocast(device, precision):
        outputs = model.predict(
            on_device.gene_tokens,
            on_device.gene_counts,
            on_device.aux_tokens,
            settings.output_keys,
            settings.embedding_layer_index,
        )
    return {key: value.float().cpu().numpy() for key, value in outputs.items()}


def check_batch(batch: PredictedBatch, cells: TokenizedCells, precision: str) -> None:
    """Give the cells without any count NaN outputs; stop at any other NaN or infinite input or output.

    An empty cell's outputs would be those of padding alone, which look like any other cell's: NaN says that there
    are none. A cell with counts must get finite outputs (NaN only where :attr:`OutputSpec.may_be_nan`).

    Raises
    ------
    NonFiniteOutputError
        Naming the first such cell, the output, and what can cause it.
    """
    counts, tokens = batch.inputs.gene_counts.numpy(), batch.inputs.gene_tokens.numpy()
    not_finite = ~np.isfinite(counts).all(axis=1)
    if not_finite.any():
        raise NonFiniteOutputError(
            f"the model inputs of {int(not_finite.sum())} cell(s) hold NaN or infinite counts (first: cell "
            f"{cells.obs_names[batch.rows[not_finite.argmax()]]!r}); check the counts and the settings that change "
            "them: clip_counts, invalid_counts, normalize_to_scale"
        )
    empty = ~(counts > 0).any(axis=1)
    for key, values in batch.outputs.items():
        holds_value = np.broadcast_to(value_positions(key, values.ndim, tokens, cells), values.shape)
        of_empty_cell = np.broadcast_to(empty.reshape(-1, *[1] * (values.ndim - 1)), values.shape)
        values[holds_value & of_empty_cell] = np.nan
        not_finite = np.isinf(values) if OUTPUTS[key].may_be_nan else ~np.isfinite(values)
        wrong = (not_finite & holds_value & ~of_empty_cell).reshape(len(values), -1).any(axis=1)
        if wrong.any():
            raise NonFiniteOutputError(
                f"the model's {key} output is NaN or infinite for {int(wrong.sum())} of the {len(wrong)} cells of a "
                f"batch (first: cell {cells.obs_names[batch.rows[wrong.argmax()]]!r}) although their counts are "
                f"finite: the checkpoint's weights or gene-embedding table, or the precision ({precision}), cause "
                "it; check the checkpoint, or try `precision=32`"
            )


def value_positions(key: str, ndim: int, tokens: np.ndarray, cells: TokenizedCells) -> np.ndarray:
    """Where an output of ``ndim`` dimensions holds values of its cells, as a mask broadcastable to the output.

    Every entry of a per-cell output; the :func:`~transcriptformer.model.outputs.gene_positions` of a per-gene one.
    """
    if OUTPUTS[key].level == "cell":
        return np.ones((len(tokens),) + (1,) * (ndim - 1), dtype=bool)
    positions = gene_positions(key, tokens, cells.pad_index, cells.seq_len)  # (B, L)
    return positions.reshape(positions.shape + (1,) * (ndim - 2))


def predict_positions(
    model: Predictor, cells: TokenizedCells, settings: PredictConfig, device: torch.device
) -> dict[str, np.ndarray]:
    """Every cell's outputs in input order, per gene position at full length.

    Returns
    -------
    dict of str to ndarray
        The requested outputs, ``(n_cells, ...)`` per cell and ``(n_cells, seq_len, ...)`` per gene position
        (0 at padding), plus the model inputs of :data:`INPUT_ARRAYS`: ``gene_token_indices`` and ``gene_counts``
        ``(n_cells, seq_len)``, which say which gene each position holds, and ``aux_token_indices``.
    """
    n_cells, seq_len = len(cells), cells.seq_len
    results: dict[str, np.ndarray] = {
        "gene_token_indices": np.full((n_cells, seq_len), cells.pad_index, np.int64),
        "gene_counts": np.zeros((n_cells, seq_len), np.float32),
        "aux_token_indices": np.zeros((n_cells, cells.aux_tokens.shape[1]), np.int64),
    }
    for batch in predict_batches(model, cells, settings, device):
        length = batch.inputs.gene_tokens.shape[1]
        results["gene_token_indices"][batch.rows, :length] = batch.inputs.gene_tokens.numpy()
        results["gene_counts"][batch.rows, :length] = batch.inputs.gene_counts.numpy()
        results["aux_token_indices"][batch.rows] = batch.inputs.aux_tokens.numpy()
        for key, value in batch.outputs.items():
            if OUTPUTS[key].level == "cell":
                shape = (n_cells, *value.shape[1:])
                results.setdefault(key, np.zeros(shape, value.dtype))[batch.rows] = value
            else:
                shape = (n_cells, seq_len, *value.shape[2:])
                results.setdefault(key, np.zeros(shape, value.dtype))[batch.rows, :length] = value
    return results


@dataclass
class GeneOutputs:
    """Outputs of consecutive cells with per-gene outputs on a gene axis.

    Attributes
    ----------
    n_cells : int
    cell_values : dict of str to ndarray
        Per-cell outputs, ``(n, ...)``.
    gene_values : dict of str to csr_matrix
        Per-gene numbers (``anndata="layers"``) as ``(n, n_genes)`` sparse matrices: an entry for each gene whose
        position holds a value (:func:`~transcriptformer.model.outputs.gene_positions`).
    cge : dict of str to ndarray
        Per-gene vectors (``anndata="cge"``), one row per (cell, gene) pair: ``embeddings`` ``(m, E)``,
        ``cell_index`` ``(m,)`` (rows of these outputs) and ``gene_index`` ``(m,)`` (columns of the gene axis).
    """

    n_cells: int
    cell_values: dict[str, np.ndarray] = field(default_factory=dict)
    gene_values: dict[str, sp.csr_matrix] = field(default_factory=dict)
    cge: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_batch(
        cls, batch: PredictedBatch, pad_index: int, seq_len: int, gene_columns: np.ndarray, n_genes: int
    ) -> GeneOutputs:
        """Put one batch's outputs on the gene axis.

        Parameters
        ----------
        batch
            A forward pass.
        pad_index, seq_len
            The model's padding index and full sequence length.
        gene_columns
            ``(vocab_size,)`` column of each vocabulary entry on the gene axis.
        n_genes
            Length of the gene axis.
        """
        tokens = batch.inputs.gene_tokens.numpy()
        columns = gene_columns[tokens]  # (B, L)
        n_cells = tokens.shape[0]
        chunk = cls(n_cells=n_cells)
        for key, values in batch.outputs.items():
            spec = OUTPUTS[key]
            if spec.level == "cell":
                chunk.cell_values[key] = values
                continue
            keep = gene_positions(key, tokens, pad_index, seq_len)
            if spec.anndata == "cge":
                rows, _ = np.nonzero(keep)
                chunk.cge = {"embeddings": values[keep], "cell_index": rows, "gene_index": columns[keep]}
            else:
                indptr = np.concatenate([[0], np.cumsum(keep.sum(1))])
                matrix = sp.csr_matrix((values[keep], columns[keep], indptr), shape=(n_cells, n_genes))
                matrix.sort_indices()
                chunk.gene_values[key] = matrix
        return chunk

    @classmethod
    def concat(cls, chunks: Sequence[GeneOutputs]) -> GeneOutputs:
        """Stack chunks of consecutive cells, in order."""
        if not chunks:
            raise ValueError("no chunk to concatenate")
        first = chunks[0]
        merged = cls(n_cells=sum(c.n_cells for c in chunks))
        merged.cell_values = {k: np.concatenate([c.cell_values[k] for c in chunks]) for k in first.cell_values}
        merged.gene_values = {k: sp.vstack([c.gene_values[k] for c in chunks], format="csr") for k in first.gene_values}
        if first.cge:
            offsets = np.cumsum([0] + [c.n_cells for c in chunks[:-1]])
            merged.cge = {
                "embeddings": np.concatenate([c.cge["embeddings"] for c in chunks]),
                "cell_index": np.concatenate([c.cge["cell_index"] + o for c, o in zip(chunks, offsets, strict=True)]),
                "gene_index": np.concatenate([c.cge["gene_index"] for c in chunks]),
            }
        return merged

    def take(self, cells: np.ndarray) -> GeneOutputs:
        """The outputs of some distinct cells, in the given order: cell ``i`` of the result is ``cells[i]`` here."""
        cells = np.asarray(cells)
        taken = GeneOutputs(n_cells=len(cells))
        taken.cell_values = {k: v[cells] for k, v in self.cell_values.items()}
        taken.gene_values = {k: v[cells] for k, v in self.gene_values.items()}
        if self.cge:
            new_position = np.full(self.n_cells, -1)
            new_position[cells] = np.arange(len(cells))
            cell_index = new_position[self.cge["cell_index"]]
            kept = np.flatnonzero(cell_index >= 0)
            rows = kept[np.argsort(cell_index[kept], kind="stable")]
            taken.cge = {k: v[rows] for k, v in self.cge.items()} | {"cell_index": cell_index[rows]}
        return taken


def predict_gene_outputs(
    model: Predictor,
    cells: TokenizedCells,
    settings: PredictConfig,
    device: torch.device,
    gene_columns: np.ndarray,
    on_batch: Callable[[int], object] | None = None,
    limit: MemoryLimit | None = None,
) -> GeneOutputs:
    """Every cell's outputs in input order, per-gene outputs on the gene axis of ``gene_columns``.

    Parameters
    ----------
    model, cells, settings, device, limit
        As for :func:`predict_batches`.
    gene_columns
        ``(vocab_size,)`` column of each vocabulary entry on the gene axis, ``-1`` for entries not on it.
    on_batch
        Called with the number of cells of each finished batch (e.g. a progress bar's ``update``).
    """
    n_genes = int(gene_columns.max()) + 1 if gene_columns.size else 0
    rows, chunks = [], []
    for batch in predict_batches(model, cells, settings, device, limit):
        rows.append(batch.rows)
        chunks.append(GeneOutputs.from_batch(batch, cells.pad_index, cells.seq_len, gene_columns, n_genes))
        if on_batch is not None:
            on_batch(len(batch.rows))
    return GeneOutputs.concat(chunks).take(np.argsort(np.concatenate(rows)))
