"""Outputs of perturbed variants of cells, computed from the first position where each differs from its cell.

TranscriptFormer is causal over a cell's gene positions: the output at gene position ``i`` depends on the aux
tokens, ``[START]`` and the genes and counts at positions ``0 .. i - 1`` (its shifted inputs), on nothing later. A
variant of a cell (the cell with some genes' counts changed and tokenized as any cell: a knock-out takes a gene
out, so the later genes move one position left and, in a cell cut at ``seq_len``, the next gene enters at the end;
an over-expressed gene takes the place the checkpoint's gene order gives it) whose first position that differs
from the cell, token or count, is ``p`` has the cell's inputs at positions ``0 .. p``, and so the cell's keys,
values and outputs there, in every layer.

:func:`predict_variants` runs each cell once into a :class:`~transcriptformer.model.attention.KVCache` and each
variant over the positions after ``p`` only, attending to its cell's cached keys and values. It assembles the
outputs of :meth:`~transcriptformer.model.transcriptformer.TranscriptFormer.predict`:

* the cell embedding sums the outputs of all positions: the cell's before ``p + 1``, the variant's after;
* the count head's logit and the gene-id cross-entropy at a position depend on the output there and the gene (or
  target) of that position: the cell's before ``p``, computed from ``p`` on (the output at ``p`` is the cell's);
  ``mu`` is the softmax of the logits over the variant's genes times its total count.

Variants, of one cell or of several, run in passes of variants whose first positions and lengths are close: a
pass computes the positions from the smallest first position of its variants to the end of the longest (the
positions between are inputs equal to the cell's, so recomputing them gives the cell's numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from transcriptformer.model.attention import KVCache
from transcriptformer.model.likelihood import next_token_targets
from transcriptformer.model.outputs import OUTPUTS, check_output_keys, needs_head
from transcriptformer.model.transcriptformer import ModelOutput, TranscriptFormer

# Positions computed per pass (variants x positions from the pass's first position to its end).
DEFAULT_MAX_TOKENS = 16384

# A pass may recompute this share of its positions (equal to its cells'), unless it is smaller than SMALL_PASS x
# max_tokens: fewer, larger passes where each costs little.
MAX_RECOMPUTED = 0.1
SMALL_PASS = 1 / 16

# Gene-id logits (positions x vocabulary) held at once.
MAX_GENE_LOGITS = 1 << 24


class SharedPrefixCache(KVCache):
    """A :class:`KVCache` of variants whose first ``length`` positions are those of cells cached in ``cells``.

    The keys and values of those positions are gathered from the cells' cache one layer at a time, when the layer
    runs, so a pass holds one layer's copy, not all layers' (the bookkeeping of :class:`KVCache` is unchanged).

    Parameters
    ----------
    cells
        The cells' cache, holding at least ``length`` positions.
    rows
        ``(B,)`` long: the cell (row of ``cells``) of each variant.
    length
        Positions shared with the cells (aux positions included).
    capacity
        Positions of the variants (aux positions included).
    """

    def __init__(self, cells: KVCache, rows: Tensor, length: int, capacity: int):
        # Not KVCache.__init__: no keys and values of its own, only the bookkeeping of every position.
        if length > cells.length:
            raise ValueError(f"the cells' cache holds {cells.length} positions; {length} asked for")
        self.cells, self.rows = cells, rows
        self.count_bias = cells.count_bias.new_zeros(len(rows), capacity)
        self.kv_is_pad = torch.ones(len(rows), capacity, dtype=torch.bool, device=rows.device)
        self.count_bias[:, :length] = cells.count_bias[rows, :length]
        self.kv_is_pad[:, :length] = cells.kv_is_pad[rows, :length]
        self.length = length
        self.new = 0

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The cells' keys and values of the shared positions followed by the ``(B, H, T, D)`` new ones."""
        shared = slice(0, self.length)
        keys = torch.cat([self.cells.keys[layer, self.rows, :, shared].to(k.dtype), k], dim=2)
        values = torch.cat([self.cells.values[layer, self.rows, :, shared].to(v.dtype), v], dim=2)
        return keys, values


@dataclass
class CellRun:
    """The unperturbed cells, run once over their first ``N`` gene positions: what their variants reuse.

    Attributes
    ----------
    cache : KVCache
        Keys and values of every layer at the aux positions and the ``N`` gene positions.
    hidden : Tensor
        ``(C, N, E)`` outputs.
    hidden_sums : Tensor
        ``(C, N + 1, E)`` float64: the sum of the outputs of the positions before each (0 before the first).
    count_logits : Tensor or None
        ``(C, N)`` count-head logits, when an output needs the count head.
    gene_nll : Tensor or None
        ``(C, N)`` gene-id cross-entropies (0 at padding), when an output needs the gene-id head.
    """

    cache: KVCache
    hidden: Tensor
    hidden_sums: Tensor
    count_logits: Tensor | None
    gene_nll: Tensor | None


@dataclass(frozen=True)
class Pass:
    """Variants run together over the gene positions ``start .. length - 1``."""

    variants: np.ndarray
    start: int
    length: int


@torch.no_grad()
def predict_variants(
    model: TranscriptFormer,
    cell_tokens: Tensor,
    cell_counts: Tensor,
    aux_tokens: Tensor | None,
    variant_tokens: Tensor,
    variant_counts: Tensor,
    variant_cell: Tensor,
    output_keys: Collection[str],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    on_pass: Callable[[int], None] | None = None,
) -> dict[str, Tensor]:
    """The outputs of perturbed variants of cells, reusing each cell's unperturbed prefix.

    Equals ``model.predict(variant_tokens, variant_counts, aux_tokens[variant_cell], output_keys)`` (within
    float32 rounding) in the same layout, at the cost of running each cell once and each variant from its first
    changed position on.

    Parameters
    ----------
    model
        In eval mode.
    cell_tokens, cell_counts
        ``(C, L)`` the unperturbed cells' model inputs (long tokens, float counts), ``[PAD]`` and 0 after a cell's
        genes, as :meth:`~transcriptformer.data.tokenize.TokenizedCells.batch` builds them.
    aux_tokens
        ``(C, A)`` the cells' aux tokens, when the model has aux columns; a variant has its cell's.
    variant_tokens, variant_counts
        ``(V, L)`` each variant's model inputs, padded to the same length ``L`` as the cells.
    variant_cell
        ``(V,)`` long: the cell (row of ``cell_tokens``) of each variant; at least one variant.
    output_keys
        Names of :data:`~transcriptformer.model.outputs.OUTPUTS`.
    max_tokens
        Positions computed per pass (variants x positions of the pass): bounds the memory of a pass. All the
        cells run in one pass and their keys and values (``2 x layers x C x (A + L) x E`` numbers) are held
        until the end: give as many cells at a time as memory allows.
    on_pass
        Called with the number of variants of each pass when it is done (a progress bar).

    Returns
    -------
    dict of str to Tensor
        Float32 on the model's device: ``(V, ...)`` per cell, ``(V, L, ...)`` per gene position (0 at padding),
        position ``j`` holding the value of the variant's gene ``variant_tokens[:, j]``, as ``predict`` gives them.
    """
    check_output_keys(output_keys, model.output_keys)
    _check_inputs(model, cell_tokens, cell_counts, aux_tokens, variant_tokens, variant_counts, variant_cell)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not len(variant_cell):
        raise ValueError("no variants to run")
    cell_counts, variant_counts = cell_counts.float(), variant_counts.float()
    lengths = needed_lengths(variant_tokens, model.special_tokens.pad)
    starts = first_changed_positions(cell_tokens, cell_counts, variant_tokens, variant_counts, variant_cell, lengths)
    cells = int(starts.max())  # the cells' positions that some variant reuses
    results: dict[str, Tensor] = {}
    run = run_cells(model, cell_tokens[:, :cells], cell_counts[:, :cells], aux_tokens, output_keys)
    whole_rows = "cge" in output_keys  # cge: every position of a variant is an output
    for planned in plan_passes(starts.cpu().numpy(), lengths.cpu().numpy(), max_tokens, whole_rows):
        index = torch.from_numpy(planned.variants).to(variant_cell.device)
        positions = slice(0, planned.length)
        outputs = run_pass(
            model,
            run,
            variant_cell[index],
            variant_tokens[index, positions],
            variant_counts[index, positions],
            planned.start,
            output_keys,
        )
        for key, value in outputs.items():
            if OUTPUTS[key].level == "cell":
                results.setdefault(key, value.new_zeros(len(variant_cell), *value.shape[1:]))[index] = value
            else:
                shape = (len(variant_cell), variant_tokens.shape[1], *value.shape[2:])
                results.setdefault(key, value.new_zeros(shape))[index, positions] = value
        if on_pass is not None:
            on_pass(len(planned.variants))
    return results


def _check_inputs(
    model: TranscriptFormer,
    cell_tokens: Tensor,
    cell_counts: Tensor,
    aux_tokens: Tensor | None,
    variant_tokens: Tensor,
    variant_counts: Tensor,
    variant_cell: Tensor,
) -> None:
    """Raise a ``ValueError`` naming the mismatch when the inputs' shapes do not go together."""
    n_cells, length = cell_tokens.shape
    shapes = {
        "cell_counts": (cell_counts.shape, (n_cells, length)),
        "variant_tokens": (variant_tokens.shape[1:], (length,)),
        "variant_counts": (variant_counts.shape, variant_tokens.shape),
        "variant_cell": (variant_cell.shape, variant_tokens.shape[:1]),
    }
    for name, (got, want) in shapes.items():
        if tuple(got) != tuple(want):
            raise ValueError(f"{name} has shape {tuple(got)}, expected {tuple(want)}")
    if length > model.seq_len:
        raise ValueError(f"the inputs have {length} positions; the model reads {model.seq_len} at most")
    if len(variant_cell) and (int(variant_cell.min()) < 0 or int(variant_cell.max()) >= n_cells):
        raise ValueError(
            f"variant_cell must index the {n_cells} cells, got values in [{variant_cell.min()}, {variant_cell.max()}]"
        )
    if aux_tokens is not None and len(aux_tokens) != n_cells:
        raise ValueError(f"aux_tokens has {len(aux_tokens)} rows for {n_cells} cells")


def needed_lengths(gene_tokens: Tensor, pad: int) -> Tensor:
    """``(B,)`` positions that hold a value: up to one past the last gene (whose output is the last), at most ``L``.

    The batch loop trims a batch to this length too (:func:`~transcriptformer.data.batching.batch_length`).
    """
    length = gene_tokens.shape[1]
    is_gene = gene_tokens != pad
    last = length - 1 - is_gene.flip(1).int().argmax(1)
    last = torch.where(is_gene.any(1), last, -1)
    return torch.clamp(last + 2, max=length)


def first_changed_positions(
    cell_tokens: Tensor,
    cell_counts: Tensor,
    variant_tokens: Tensor,
    variant_counts: Tensor,
    variant_cell: Tensor,
    lengths: Tensor,
) -> Tensor:
    """``(V,)`` each variant's first gene position to run: one past its first position that differs from its cell.

    The output there is the first that the change can reach. At most the variant's length (a variant equal to its
    cell runs no position), at least 1 (position 0's input is ``[START]``).
    """
    differs = (variant_tokens != cell_tokens[variant_cell]) | (variant_counts != cell_counts[variant_cell])
    first = torch.where(differs.any(1), differs.int().argmax(1), variant_tokens.shape[1])
    return torch.minimum(first + 1, lengths)


def run_cells(
    model: TranscriptFormer, gene_tokens: Tensor, gene_counts: Tensor, aux_tokens: Tensor | None, output_keys
) -> CellRun:
    """Run ``(C, N)`` cells once into a key/value cache and keep what their variants reuse."""
    n_cells, length = gene_tokens.shape
    cache, first_output = model.start_decoding(aux_tokens, n_cells, length - 1)
    hidden = first_output[:, None]
    if length > 1:
        hidden = torch.cat([hidden, model.decode_genes(gene_tokens[:, :-1], gene_counts[:, :-1], cache)], dim=1)
    hidden_sums = torch.cumsum(hidden.double(), dim=1)
    hidden_sums = torch.cat([torch.zeros_like(hidden_sums[:, :1]), hidden_sums], dim=1)
    count_logits, gene_nll = position_scores(model, hidden, gene_tokens, gene_counts, 0, output_keys)
    return CellRun(cache, hidden, hidden_sums, count_logits, gene_nll)


def position_scores(
    model: TranscriptFormer, hidden: Tensor, gene_tokens: Tensor, gene_counts: Tensor, first: int, output_keys
) -> tuple[Tensor | None, Tensor | None]:
    """Count-head logits and gene-id cross-entropies of the positions ``first ..`` of ``(B, N)`` cells.

    ``hidden`` holds the ``(B, N - first, E)`` outputs of those positions. Each is computed when an output of
    ``output_keys`` needs its head, else None.
    """
    positions = slice(first, gene_tokens.shape[1])
    tokens = gene_tokens[:, positions]
    count_logits = model.count_logits(hidden, tokens) if needs_head(output_keys, "count") else None
    if not needs_head(output_keys, "gene_id"):
        return count_logits, None
    special = model.special_tokens
    targets, _ = next_token_targets(gene_tokens, gene_counts, special.end, model.seq_len)
    return count_logits, gene_nll_of_genes(model, hidden, targets[:, positions], tokens != special.pad)


def gene_nll_of_genes(model: TranscriptFormer, hidden: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """:meth:`TranscriptFormer.gene_nll` of the positions where ``mask`` is True; the gene-id head runs there only.

    At most :data:`MAX_GENE_LOGITS` logits exist at once.
    """
    nll = hidden.new_zeros(mask.shape, dtype=torch.float32)
    where = mask.nonzero(as_tuple=True)
    outputs, position_targets = hidden[where], targets[where]  # (n, E), (n,)
    step = max(1, MAX_GENE_LOGITS // model.gene_id_head.layers[-1].out_features)
    parts = []
    for start in range(0, len(outputs), step):
        block = slice(start, start + step)
        logits = model.gene_id_head(outputs[block])[:, None]  # (n, 1, V)
        block_targets = position_targets[block, None]
        parts.append(model.gene_nll(logits, block_targets, torch.ones_like(block_targets, dtype=torch.bool))[:, 0])
    if parts:
        nll[where] = torch.cat(parts)
    return nll


def run_pass(
    model: TranscriptFormer,
    run: CellRun,
    rows: Tensor,
    gene_tokens: Tensor,
    gene_counts: Tensor,
    start: int,
    output_keys: Collection[str],
) -> dict[str, Tensor]:
    """Outputs of ``(B, N)`` variants of the cells ``rows`` of ``run`` that equal their cells before ``start - 1``.

    The transformer runs the positions ``start .. N - 1``; the heads the positions ``start - 1 .. N - 1``.
    """
    length, aux = gene_tokens.shape[1], len(model.aux_embeddings)
    if start < length:
        cache = SharedPrefixCache(run.cache, rows, aux + start, aux + length)
        suffix = model.decode_genes(gene_tokens[:, start - 1 : -1], gene_counts[:, start - 1 : -1], cache)
    else:
        suffix = run.hidden.new_zeros(len(rows), 0, run.hidden.shape[2])  # (B, T, E)
    # The output at start - 1 is the cell's: the heads begin there, where the gene may differ.
    heads_input = torch.cat([run.hidden[rows, start - 1 : start], suffix], dim=1)
    # Only cge reads the outputs of every position.
    hidden = torch.cat([run.hidden[rows, :start], suffix], dim=1) if "cge" in output_keys else None
    count_logits, gene_nll = position_scores(model, heads_input, gene_tokens, gene_counts, start - 1, output_keys)
    sums = run.hidden_sums[rows, start] + suffix.sum(1, dtype=torch.float64)
    out = ModelOutput(hidden=hidden, embeddings=(sums / model.seq_len).to(suffix.dtype))
    if count_logits is not None:
        logits = torch.cat([run.count_logits[rows, : start - 1], count_logits], dim=1)
        out.mu = model.expected_counts(logits, gene_tokens, gene_counts)
    scores = model.likelihoods(out, gene_tokens, gene_counts)
    if gene_nll is not None:
        scores["gene_nll"] = torch.cat([run.gene_nll[rows, : start - 1], gene_nll], dim=1)
    return model.outputs(out, scores, output_keys)


def plan_passes(starts: np.ndarray, lengths: np.ndarray, max_tokens: int, whole_rows: bool = False) -> list[Pass]:
    """Group variants into passes of close first positions and lengths.

    Variants are taken by length, then first position. A pass's size is its variants times its positions (from its
    smallest first position minus one to its largest length; its largest length with ``whole_rows``). A pass grows
    while its size stays within ``max_tokens`` and, past :data:`SMALL_PASS` of it, no more than
    :data:`MAX_RECOMPUTED` of it are positions that its variants would not need alone.
    """
    order = np.lexsort((starts, lengths))
    passes, first = [], 0
    while first < len(order):
        lo, hi, needed, stop = starts[order[first]], lengths[order[first]], 0, first
        while stop < len(order):
            v = order[stop]
            new_lo, new_hi = min(lo, starts[v]), max(hi, lengths[v])
            size = (stop - first + 1) * (new_hi if whole_rows else new_hi - new_lo + 1)
            new_needed = needed + lengths[v] - starts[v] + 1
            wasteful = size > SMALL_PASS * max_tokens and size - new_needed > MAX_RECOMPUTED * size
            if stop > first and (size > max_tokens or wasteful):
                break
            lo, hi, needed, stop = new_lo, new_hi, new_needed, stop + 1
        passes.append(Pass(order[first:stop], int(lo), int(hi)))
        first = stop
    return passes
