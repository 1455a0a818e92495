"""Likelihoods of TranscriptFormer's two heads (SPEC section 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from transcriptformer.model.attention import softcap
from transcriptformer.model.outputs import end_target_position


def next_token_targets(tokens: Tensor, counts: Tensor, end_index: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Prediction targets: the tokens and counts themselves, with ``[END]`` and count 1 at the end target.

    The end-target position is :func:`~transcriptformer.model.outputs.end_target_position` of ``seq_len``.
    """
    is_end = torch.arange(tokens.shape[1], device=tokens.device) == end_target_position(seq_len)
    return torch.where(is_end, end_index, tokens), torch.where(is_end, 1.0, counts)


def zero_truncated_poisson_nll(mu: Tensor, counts: Tensor, eps: float, softplus_approx: bool = True) -> Tensor:
    """Negative log-likelihood of ``counts`` under a zero-truncated Poisson of rate ``mu``, elementwise.

    ``nll = -k log m + log(exp(m) - 1) + lgamma(k + 1)`` with ``m = mu + eps`` and ``k = max(counts, eps)``.
    With ``softplus_approx`` the normaliser is ``max(0, m - softplus(-m))``, as in the published models.
    """
    m = mu + eps
    k = torch.clamp(counts, min=eps)
    if softplus_approx:
        log_norm = torch.clamp(m - F.softplus(-m), min=0.0)
    else:
        log_norm = m + torch.log(-torch.expm1(-m))
    return -k * torch.log(m) + log_norm + torch.lgamma(k + 1)


def gene_cross_entropy(logits: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Per-position cross-entropy of softcapped gene-id logits ``(B, L, V)`` against ``(B, L)`` targets."""
    capped = softcap(logits.float(), cap)
    return F.cross_entropy(capped.transpose(1, 2), targets, reduction="none")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is True, per row; NaN for an empty row."""
    return torch.where(mask, values, 0.0).sum(-1) / mask.sum(-1)
