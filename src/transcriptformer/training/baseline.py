"""A context-free reference for the count likelihood: the per-gene mean-rate baseline.

It predicts ``mu_i = total count x r_g(i) / sum_j r_g(j)`` over a cell's genes, where ``r_g`` is gene g's mean
count over the cells that express it: the model's own softmax link with a per-gene rate and no context. A
trained model should score held-out cells better than this baseline.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from transcriptformer.data.tokenize import Batch
from transcriptformer.model.likelihood import next_token_targets, zero_truncated_poisson_nll
from transcriptformer.model.transcriptformer import TranscriptFormer


def per_gene_mean_rate(batches: Iterable[Batch], vocab_size: int, pad: int) -> torch.Tensor:
    """Mean count of each gene over the cells of ``batches`` that express it; the overall mean for unseen genes."""
    total, seen = torch.zeros(vocab_size), torch.zeros(vocab_size)
    for batch in batches:
        expressed = batch.gene_tokens != pad
        total.index_add_(0, batch.gene_tokens[expressed], batch.gene_counts[expressed])
        seen.index_add_(0, batch.gene_tokens[expressed], torch.ones(int(expressed.sum())))
    overall = total.sum() / seen.sum()
    return torch.where(seen > 0, total / seen.clamp(min=1), overall)


def mean_rate_count_nll(batches: Iterable[Batch], rates: torch.Tensor, model: TranscriptFormer) -> float:
    """Count NLL per expressed gene of the baseline, with the model's targets and likelihood.

    Parameters
    ----------
    batches
        Cells to score.
    rates
        From :func:`per_gene_mean_rate`.
    model
        Supplies the special tokens, ``seq_len`` and the likelihood settings.
    """
    special, cfg = model.special_tokens, model.model_config
    nll_sum, n_tokens = 0.0, 0
    for batch in batches:
        mask = batch.gene_tokens != special.pad
        weights = torch.where(mask, rates[batch.gene_tokens], 0.0)
        mu = weights / weights.sum(-1, keepdim=True) * batch.gene_counts.sum(-1, keepdim=True)
        _, targets = next_token_targets(batch.gene_tokens, batch.gene_counts, special.end, cfg.seq_len)
        nll = zero_truncated_poisson_nll(mu, targets, cfg.log_counts_eps, model.loss_config.softplus_approx)
        nll_sum += float(nll[mask].sum())
        n_tokens += int(mask.sum())
    return nll_sum / max(n_tokens, 1)
