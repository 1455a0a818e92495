"""Building blocks of TranscriptFormer: MLP heads, the gene-embedding module and the encoder layer."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from transcriptformer.model.attention import AttentionInputs, KVCache, MultiHeadSelfAttention

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class MLP(nn.Module):
    """``Linear -> ReLU -> LayerNorm -> Dropout -> Linear`` (state-dict keys ``layers.0``, ``.2``, ``.4``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(),
            nn.LayerNorm(hidden_dim),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to the last dimension."""
        return self.layers(x)


class GeneEmbedding(nn.Module):
    """Frozen protein-language-model table row of each gene, projected to the model width.

    Parameters
    ----------
    table : Tensor
        ``(V, esm_dim)`` embedding of every vocabulary entry; kept frozen.
    embed_dim : int
        Model width ``E``.
    """

    def __init__(self, table: Tensor, embed_dim: int, dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(table, freeze=True)
        self.mlp = MLP(table.shape[1], embed_dim, embed_dim, dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B, L)`` token indices -> ``(B, L, E)``."""
        return self.mlp(self.embedding(tokens))


class CountHead(nn.Module):
    """Per-position log-rate of the count: an MLP of [output, gene embedding] plus a per-gene bias."""

    def __init__(self, embed_dim: int, vocab_size: int, dropout: float = 0.0):
        super().__init__()
        self.mlp = MLP(2 * embed_dim, embed_dim // 2, 1, dropout)
        self.gene_embedding = nn.Embedding(vocab_size, 1)

    def forward(self, hidden: Tensor, gene_embedding: Tensor, tokens: Tensor) -> Tensor:
        """``(B, L, E)``, ``(B, L, E)``, ``(B, L)`` -> ``(B, L)`` unnormalised log-rates."""
        logits = self.mlp(torch.cat([hidden, gene_embedding], dim=-1)).squeeze(-1)
        return logits + self.gene_embedding(tokens).squeeze(-1)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer whose residual is taken from the *normalised* input, as in the original.

    ``x = norm1(x); x = attn(x) + x; x = norm2(x); x = W2(dropout(act(W1 x))) + x``
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float = 0.0,
        activation: str = "gelu",
        attn_bias: bool = False,
        ffn_bias: bool = False,
    ):
        super().__init__()
        self.self_attn = MultiHeadSelfAttention(embed_dim, num_heads, bias=attn_bias)
        self.linear1 = nn.Linear(embed_dim, ffn_dim, bias=ffn_bias)
        self.linear2 = nn.Linear(ffn_dim, embed_dim, bias=ffn_bias)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: Tensor, attention: AttentionInputs, cache: tuple[KVCache, int] | None = None) -> Tensor:
        """``(B, N, E)`` -> ``(B, N, E)``; ``cache`` as for :class:`MultiHeadSelfAttention`."""
        x = self.norm1(x)
        x = self.self_attn(x, attention, cache) + x
        x = self.norm2(x)
        return self.linear2(self.dropout(self.activation(self.linear1(x)))) + x


class TransformerEncoder(nn.Module):
    """A stack of :class:`EncoderLayer` (no final norm)."""

    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.encoder_layers = nn.ModuleList([EncoderLayer(**layer_kwargs) for _ in range(num_layers)])

    def forward(self, x: Tensor, attention: AttentionInputs, cache: KVCache | None = None) -> Tensor:
        """Run every layer with the same attention inputs (over the cached positions too, given ``cache``)."""
        output = x
        for output in self.layer_outputs(x, attention, cache):  # noqa: B007 (it ends as the last layer's output)
            pass
        return output

    def layer_outputs(self, x: Tensor, attention: AttentionInputs, cache: KVCache | None = None) -> Iterator[Tensor]:
        """``(B, N, E)`` output of each layer in turn; the cache (when given) is committed after the last."""
        for index, layer in enumerate(self.encoder_layers):
            x = layer(x, attention, None if cache is None else (cache, index))
            yield x
        if cache is not None:
            cache.commit()
