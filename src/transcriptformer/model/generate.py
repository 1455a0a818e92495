"""Autoregressive generation of cells: the next gene from the gene-id head, its count from the count head.

At each position ``i`` of a cell (docs/generate.md):

1. the output ``h_i`` at position ``i`` (which has seen the aux tokens, ``[START]`` and the genes and counts before
   it) gives the next gene's distribution, the softmax of the gene-id logits over the vocabulary, without the
   genes already emitted and the special tokens other than ``[END]``, after temperature, top-k and top-p;
2. the gene ``g_i`` is drawn from it (or taken from a prompt); ``[END]`` ends the cell;
3. its count is drawn from the count head's zero-truncated Poisson. The model's expected count is
   ``mu_i = T * exp(l_i) / sum_j exp(l_j)`` over all ``N`` positions of the finished cell (``l`` the count-head
   logits, ``T`` its total count), which are not known yet; the running estimate
   ``mu_i = (T / N) * exp(l_i) / mean_{j <= i} exp(l_j)`` with the cell's target ``N`` genes and ``T`` total count
   stands for it, and equals it at ``i = N - 1``. Counts above the data's ``clip_counts`` are clipped, as the
   model's inputs are;
4. ``(g_i, count)`` becomes the input of position ``i + 1``.

With the key/value cache, step ``i`` costs one query per layer over the ``i`` cached positions; without it, a
forward pass over all of them (the reference). Both draw the same random numbers and give the same cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from transcriptformer.errors import UserError
from transcriptformer.model.sampling import (
    cell_uniforms,
    filtered_probabilities,
    sample_categorical,
    sample_zero_truncated_poisson,
)
from transcriptformer.model.transcriptformer import TranscriptFormer

# Counts 1 .. this many are tabulated for one draw at most, when the checkpoint does not clip counts.
MAX_COUNT_TABLE = 10_000_000


@dataclass
class Sampler:
    """How the next gene is drawn (the fields of :class:`~transcriptformer.config.SamplingConfig` of that name)."""

    temperature: float
    top_k: int
    top_p: float


@dataclass
class Prompt:
    """The genes each cell starts with instead of drawing them.

    Attributes
    ----------
    tokens : Tensor
        ``(B, P)`` long, ``[PAD]`` past the end of a cell's prompt.
    counts : Tensor
        ``(B, P)`` float; NaN where the count is to be drawn.
    """

    tokens: Tensor
    counts: Tensor


@dataclass
class GeneratedCells:
    """Cells sampled from a model, genes in the order they were generated.

    Attributes
    ----------
    tokens : Tensor
        ``(B, L)`` long vocabulary indices, ``[PAD]`` after a cell's last gene.
    counts : Tensor
        ``(B, L)`` float counts (integers ``>= 1``), 0 at padding.
    ended : Tensor
        ``(B,)`` bool, True where the model emitted ``[END]`` before the cell's target number of genes.
    """

    tokens: Tensor
    counts: Tensor
    ended: Tensor


@torch.no_grad()
def generate_cells(
    model: TranscriptFormer,
    aux_tokens: Tensor | None,
    num_genes: Tensor,
    library_size: Tensor,
    generators: list[np.random.Generator],
    excluded: Tensor,
    *,
    sampler: Sampler,
    max_count: float | None,
    prompt: Prompt | None = None,
    use_cache: bool = True,
) -> GeneratedCells:
    """Sample ``B`` cells together; each stops at ``[END]`` or at its number of genes.

    Parameters
    ----------
    model
        In eval mode, with a gene-id head.
    aux_tokens
        ``(B, A)`` conditions, when the model has aux columns.
    num_genes
        ``(B,)`` long: genes of each cell at most (and ``N`` of the count rule).
    library_size
        ``(B,)`` float: ``T`` of the count rule.
    generators
        One per cell: where its random numbers come from.
    excluded
        ``(V,)`` bool: vocabulary entries never drawn (the special tokens other than ``[END]``).
    sampler
        Temperature, top-k, top-p.
    max_count
        Counts are clipped to it (the data's ``clip_counts``); ``None``: not clipped.
    prompt
        Genes (and counts) the cells start with.
    use_cache
        Decode with a key/value cache instead of rerunning the whole sequence at every step.
    """
    if model.gene_id_head is None:
        raise ValueError("this model has no gene-id head (gene_id_loss_weight = 0), so it cannot generate genes")
    batch, steps = len(generators), int(num_genes.max())
    device, special = num_genes.device, model.special_tokens
    tokens = torch.full((batch, steps), special.pad, dtype=torch.long, device=device)
    counts = torch.zeros(batch, steps, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    ended = torch.zeros_like(done)
    emitted = excluded.to(device).expand(batch, -1).clone()  # (B, V): entries that cannot come next
    log_weights = torch.full((batch,), -torch.inf, dtype=torch.float64, device=device)  # log sum_j exp(l_j)
    mean_count = library_size.double() / num_genes.double()  # T / N
    cache, hidden = model.start_decoding(aux_tokens, batch, steps) if use_cache else (None, None)
    for i in range(steps):
        if cache is None:
            hidden = full_pass_output(model, tokens[:, :i], counts[:, :i], aux_tokens)
        elif i > 0:
            hidden = model.decode(tokens[:, i - 1], counts[:, i - 1], cache)
        uniforms = cell_uniforms(generators, 2, device)  # (B, 2): the gene's and the count's
        gene_logits = model.next_gene_logits(hidden).masked_fill(emitted, -torch.inf)
        check_finite(gene_logits.isnan() | gene_logits.isposinf(), ~done, "gene-id logits", i)
        genes = sample_categorical(filtered_probabilities(gene_logits, **vars(sampler)), uniforms[:, 0])
        count_logits = model.count_logits(hidden, genes).double()
        if prompt is not None and i < prompt.tokens.shape[1]:
            forced = prompt.tokens[:, i] != special.pad
            genes = torch.where(forced, prompt.tokens[:, i], genes)
            count_logits = torch.where(forced, model.count_logits(hidden, genes).double(), count_logits)
        log_weights = torch.logaddexp(log_weights, count_logits)
        rate = mean_count * torch.exp(count_logits - log_weights) * (i + 1)
        check_finite(~torch.isfinite(rate), ~done & (genes != special.end), "expected counts", i)
        cell_counts = sample_zero_truncated_poisson(rate, _count_bound(rate, max_count), uniforms[:, 1])
        if prompt is not None and i < prompt.counts.shape[1]:
            given = ~torch.isnan(prompt.counts[:, i]) & (prompt.tokens[:, i] != special.pad)
            cell_counts = torch.where(given, prompt.counts[:, i].double(), cell_counts)
        is_end = (genes == special.end) & ~done
        writes = ~done & ~is_end
        tokens[:, i] = torch.where(writes, genes, special.pad)
        counts[:, i] = torch.where(writes, cell_counts, 0.0).float()
        emitted[writes, genes[writes]] = True
        ended |= is_end
        done |= is_end | (i + 1 >= num_genes)
        if bool(done.all()):
            break
    return GeneratedCells(tokens, counts, ended)


def check_finite(not_finite: Tensor, active: Tensor, what: str, step: int) -> None:
    """Stop when a cell still being generated has a NaN or infinite value (``not_finite``: ``(B,)`` or ``(B, V)``).

    Drawing from such values would give a cell that looks normal (the last gene at every step, say) but is not a
    sample of the model; the batch loop of inference stops the same way.

    Raises
    ------
    UserError
        Naming what is not finite, for how many cells, and at which gene.
    """
    wrong = (not_finite.reshape(len(active), -1).any(dim=1) & active).sum()
    if wrong:
        raise UserError(
            f"the model's {what} are NaN or infinite for {int(wrong)} of {len(active)} cells at gene {step + 1}, so "
            "no gene can be drawn: the checkpoint's weights, its gene-embedding table or the library_size cause "
            "it; check the checkpoint, or lower library_size"
        )


def _count_bound(rate: Tensor, max_count: float | None) -> int:
    """Largest count drawn: ``max_count``, or (unclipped) far enough in the tail of the largest rate.

    Raises
    ------
    UserError
        When, unclipped, the largest rate asks for a table of counts larger than :data:`MAX_COUNT_TABLE`.
    """
    if max_count is not None:
        return max(1, int(max_count))
    largest = float(rate.max())
    bound = largest + 12 * largest**0.5 + 20
    if bound > MAX_COUNT_TABLE:
        raise UserError(
            f"a generated gene's expected count reaches {largest:.3g}, too large to draw for a checkpoint without "
            "clip_counts: lower library_size (a cell's total count over its genes)"
        )
    return int(bound)


def full_pass_output(model: TranscriptFormer, tokens: Tensor, counts: Tensor, aux_tokens: Tensor | None) -> Tensor:
    """``(B, E)`` output at the position after ``tokens``: a forward pass over the whole sequence so far."""
    batch = tokens.shape[0]
    pad = torch.full((batch, 1), model.special_tokens.pad, dtype=tokens.dtype, device=tokens.device)
    out = model(
        torch.cat([tokens, pad], dim=1),
        torch.cat([counts, counts.new_zeros(batch, 1)], dim=1),
        aux_tokens,
        embed_mode=True,
        compute_mu=False,
        compute_gene_logits=False,
    )
    return out.hidden[:, -1]
