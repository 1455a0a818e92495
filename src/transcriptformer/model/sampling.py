"""Sampling the next gene and its count from the model's two heads, from given uniform random numbers.

Each cell draws its own uniform numbers (:func:`cell_uniforms`), so a cell's sample depends on the seed and the
cell's index alone: not on the batch it runs in, nor on the device. A draw is made by inverting the cumulative
distribution at the cell's uniform number.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def cell_uniforms(generators: list[np.random.Generator], n: int, device: torch.device) -> Tensor:
    """``(B, n)`` float64 uniform numbers in ``[0, 1)``, row ``i`` from ``generators[i]``."""
    return torch.from_numpy(np.stack([g.random(n) for g in generators])).to(device)


def filtered_probabilities(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """``(B, V)`` logits -> ``(B, V)`` float64 probabilities after temperature, top-k and top-p (nucleus) filtering.

    Rows of finite logits (``-inf`` for entries that cannot be drawn, at least one finite) give finite
    probabilities for any finite ``temperature > 0``.

    Parameters
    ----------
    temperature
        Divides the logits (> 0); below 1 sharpens, above 1 flattens the distribution.
    top_k
        Keep the ``top_k`` most likely entries; 0 keeps all.
    top_p
        Keep the smallest set of most likely entries whose probability reaches ``top_p``; 1 keeps all.
    """
    logits = logits.double()
    # Shifted first, so that a temperature near 0 gives the most likely entry, not an overflow (inf - inf = NaN).
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_k == 0 and top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if top_k > 0:
        keep[:, min(top_k, keep.shape[-1]) :] = False
    if top_p < 1.0:
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep &= mass_before < top_p
    kept = torch.zeros_like(keep).scatter(-1, order, keep)
    probs = probs * kept
    return probs / probs.sum(-1, keepdim=True)


def sample_categorical(probs: Tensor, uniforms: Tensor) -> Tensor:
    """``(B, V)`` probabilities and ``(B,)`` uniforms -> ``(B,)`` indices: the first whose cumulative sum passes."""
    cumulative = torch.cumsum(probs, dim=-1)
    index = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    # A uniform past the last cumulative value (rounding) takes the last entry with probability.
    last = probs.shape[-1] - 1 - torch.argmax((probs.flip(-1) > 0).int(), dim=-1)
    return torch.minimum(index, last)


def zero_truncated_poisson_probabilities(rate: Tensor, max_count: int) -> Tensor:
    """``(B,)`` rates -> ``(B, max_count)`` float64 probabilities of the counts ``1 .. max_count``.

    A zero-truncated Poisson (the count head's distribution), with the mass of every count above ``max_count``
    on ``max_count`` (the model's inputs are clipped there).
    """
    rate = rate.double().clamp(min=1e-12)[:, None]
    k = torch.arange(1, max_count + 1, device=rate.device, dtype=torch.float64)
    log_pmf = k * torch.log(rate) - torch.lgamma(k + 1) - rate - torch.log(-torch.expm1(-rate))
    pmf = torch.exp(log_pmf)
    pmf[:, -1] = (1.0 - pmf[:, :-1].sum(-1)).clamp(min=0.0)
    return pmf


def sample_zero_truncated_poisson(rate: Tensor, max_count: int, uniforms: Tensor) -> Tensor:
    """``(B,)`` float64 counts ``>= 1`` drawn from zero-truncated Poissons of ``rate``, clipped at ``max_count``."""
    return (sample_categorical(zero_truncated_poisson_probabilities(rate, max_count), uniforms) + 1).double()
