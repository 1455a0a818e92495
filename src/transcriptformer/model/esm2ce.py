"""The ``esm2ce`` baseline: a cell is the mean of the frozen protein-embedding rows of its genes, no transformer.

It has the prediction interface of :class:`~transcriptformer.model.transcriptformer.TranscriptFormer`, so that the
batch loop runs either model the same way.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn

from transcriptformer.model.outputs import check_output_keys
from transcriptformer.model.transcriptformer import SpecialTokens


class ESM2CellEmbedding(nn.Module):
    """Mean of the gene-embedding rows of each cell's genes (padding left out).

    Parameters
    ----------
    gene_embedding : nn.Embedding
        The frozen ``(V, esm_dim)`` table of a checkpoint (shared with its model, not copied).
    special_tokens : SpecialTokens
        Indices of ``[PAD]``, ``[START]`` and ``[END]``.
    seq_len : int
        Gene positions of a full-length cell.
    """

    output_keys = ("embeddings",)

    def __init__(self, gene_embedding: nn.Embedding, special_tokens: SpecialTokens, seq_len: int):
        super().__init__()
        self.gene_embedding = gene_embedding
        self.special_tokens = special_tokens
        self.seq_len = seq_len

    def length_multiple(self, device: torch.device) -> int:
        """No attention: batches are trimmed exactly."""
        return 1

    @torch.no_grad()
    def predict(
        self,
        gene_tokens: Tensor,
        gene_counts: Tensor,
        aux_tokens: Tensor | None,
        output_keys: Collection[str],
        embedding_layer_index: int = -1,
    ) -> dict[str, Tensor]:
        """``embeddings`` ``(B, esm_dim)``; counts and aux tokens play no part; the baseline has no layers."""
        check_output_keys(output_keys, self.output_keys)
        if embedding_layer_index != -1:
            raise ValueError(
                "embedding_layer_index applies to a TranscriptFormer's layers; the esm2ce baseline has none: "
                "leave it at -1"
            )
        rows = self.gene_embedding(gene_tokens)  # (B, L, esm_dim)
        valid = (gene_tokens != self.special_tokens.pad)[..., None]
        return {"embeddings": ((rows * valid).sum(1) / valid.sum(1).clamp(min=1)).float()}
