"""The training objective (SPEC sections 5-6, training mode).

``loss = count NLL + gene_id_loss_weight * gene cross-entropy``, each averaged over the unpadded positions of
the batch. The forward pass runs with ``embed_mode=False`` (no count bias on the attention diagonal); dropout
follows the module's ``train()``/``eval()`` mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from transcriptformer.data.tokenize import Batch
from transcriptformer.model.transcriptformer import TranscriptFormer


class ObjectiveTerms(Protocol):
    """The objective of one batch, whichever the task: the loss and what is logged and reported of it."""

    loss: Tensor

    def summary(self) -> str:
        """One line that reports the batch."""

    def logged(self) -> dict[str, Tensor]:
        """Metric name (``loss`` first) -> value, logged per step and epoch."""


@dataclass
class LossTerms:
    """The objective of one batch and its parts.

    Attributes
    ----------
    loss : Tensor
        Scalar to minimise.
    count_nll : Tensor
        Mean zero-truncated Poisson NLL of the counts over unpadded positions.
    gene_nll : Tensor or None
        Mean gene-id cross-entropy over unpadded positions; ``None`` for a model without gene-id head.
    n_tokens : int
        Unpadded positions scored.
    """

    loss: Tensor
    count_nll: Tensor
    gene_nll: Tensor | None
    n_tokens: int

    def summary(self) -> str:
        """One line: loss, its parts and the number of tokens."""
        gene = "" if self.gene_nll is None else f", gene NLL {float(self.gene_nll):.4f}"
        parts = f"count NLL {float(self.count_nll):.4f}{gene}"
        return f"loss {float(self.loss.detach()):.4f} ({parts}) over {self.n_tokens} tokens"

    def logged(self) -> dict[str, Tensor]:
        """The loss and its parts."""
        values = {"loss": self.loss.detach(), "count_nll": self.count_nll}
        return values if self.gene_nll is None else {**values, "gene_nll": self.gene_nll}


def training_loss(model: TranscriptFormer, batch: Batch) -> LossTerms:
    """Forward ``batch`` in training mode and return the objective.

    Parameters
    ----------
    model
        The model, possibly with LoRA layers injected (the modules of a ``peft`` model's base model).
    batch
        Model inputs; positions whose token is ``[PAD]`` are not scored.
    """
    weight = model.loss_config.gene_id_loss_weight
    out = model(
        batch.gene_tokens, batch.gene_counts, batch.aux_tokens, embed_mode=False, compute_gene_logits=weight > 0
    )
    scores = model.likelihoods(out, batch.gene_tokens, batch.gene_counts)
    n_tokens = int(scores["mask"].sum())
    denominator = max(n_tokens, 1)
    count_nll = scores["count_nll"].sum() / denominator
    loss, gene_nll = count_nll, None
    if "gene_nll" in scores:
        # After a gene-table swap, genes unknown to the gene-id head score NaN: they are left out.
        scored = scores["mask"] & ~torch.isnan(scores["gene_nll"])
        gene_nll = torch.where(scored, scores["gene_nll"], 0.0).sum() / max(int(scored.sum()), 1)
        loss = loss + weight * gene_nll
    return LossTerms(loss=loss, count_nll=count_nll.detach(), gene_nll=_detached(gene_nll), n_tokens=n_tokens)


def _detached(value: Tensor | None) -> Tensor | None:
    return None if value is None else value.detach()


@torch.no_grad()
def heldout_count_nll(model: TranscriptFormer, batches: list[Batch]) -> float:
    """Mean count NLL per unpadded position over ``batches``, in eval mode (no dropout), training-mode attention.

    Parameters
    ----------
    model
        The model to score; put into eval mode.
    batches
        Held-out cells.
    """
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        terms = training_loss(model, batch)
        total += float(terms.count_nll) * terms.n_tokens
        tokens += terms.n_tokens
    return total / max(tokens, 1)
