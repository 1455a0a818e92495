"""The TranscriptFormer model (SPEC sections 5 and 6).

State-dict keys match the published checkpoints::

    gene_embeddings.{embedding,mlp}.*     aux_embeddings.<col>.weight
    transformer_encoder.encoder_layers.N.{self_attn.linears.0-3,linear1,linear2,norm1,norm2}.*
    mu.{gene_embedding,mlp}.*             gene_id_head.layers.*
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from transcriptformer.config import LossConfig, ModelConfig
from transcriptformer.model.attention import (
    AttentionInputs,
    BlockMaskCache,
    KVCache,
    build_attention_inputs,
    preferred_length_multiple,
    resolve_backend,
    softcap,
)
from transcriptformer.model.layers import MLP, CountHead, GeneEmbedding, TransformerEncoder
from transcriptformer.model.likelihood import (
    gene_cross_entropy,
    masked_mean,
    next_token_targets,
    zero_truncated_poisson_nll,
)
from transcriptformer.model.outputs import available_outputs, check_output_keys, needs_head
from transcriptformer.runtime import Backend


@dataclass(frozen=True)
class SpecialTokens:
    """Indices of the special gene tokens the model relies on, read from the vocabulary."""

    pad: int
    start: int
    end: int


@dataclass
class ModelOutput:
    """Raw outputs of one forward pass over ``B`` cells of ``L`` gene positions.

    Attributes
    ----------
    hidden : Tensor or None
        ``(B, L, E)`` last-layer output at the gene positions (contextual gene embeddings); 0 where the (shifted)
        input is padding. Always set by :meth:`TranscriptFormer.forward`; None in outputs assembled without it
        (:mod:`transcriptformer.model.prefix`, unless ``cge`` is asked for).
    embeddings : Tensor
        ``(B, E)`` cell embeddings.
    mu : Tensor or None
        ``(B, L)`` expected counts; 0 at padded positions.
    gene_logits : Tensor or None
        ``(B, L, V)`` gene-id logits (before softcap).
    """

    hidden: Tensor | None
    embeddings: Tensor
    mu: Tensor | None = None
    gene_logits: Tensor | None = None


class TranscriptFormer(nn.Module):
    """Autoregressive transformer over the (gene, count) pairs of a cell.

    Parameters
    ----------
    model_config, loss_config
        Architecture and likelihood settings.
    gene_table : Tensor
        ``(V, esm_dim)`` frozen gene-embedding table, rows in vocabulary order.
    special_tokens : SpecialTokens
        Indices of ``[PAD]``, ``[START]`` and ``[END]``.
    aux_vocabs : mapping of str to mapping of str to int
        Vocabulary of each auxiliary column, in column order.
    aux_pad_token : str
        Entry of each aux vocabulary that marks an unknown (masked) value.
    attention_backend : {"auto", "flex", "chunked", "dense"}
        ``"auto"`` uses compiled flex attention on CUDA and the chunked exact path elsewhere.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        loss_config: LossConfig,
        gene_table: Tensor,
        special_tokens: SpecialTokens,
        aux_vocabs: Mapping[str, Mapping[str, int]],
        aux_pad_token: str = "unknown",
        attention_backend: Backend = "auto",
    ):
        super().__init__()
        cfg = model_config
        self.model_config = model_config
        self.loss_config = loss_config
        self.special_tokens = special_tokens
        self.attention_backend = attention_backend
        self.block_masks = BlockMaskCache()
        vocab_size, embed_dim = gene_table.shape[0], cfg.embed_dim

        self.gene_embeddings = GeneEmbedding(gene_table, embed_dim, cfg.dropout)
        self.aux_embeddings = nn.ModuleDict({col: nn.Embedding(len(v), embed_dim) for col, v in aux_vocabs.items()})
        self.aux_unknown = [vocab[aux_pad_token] for vocab in aux_vocabs.values()]
        self.transformer_encoder = TransformerEncoder(
            cfg.num_layers,
            embed_dim=embed_dim,
            num_heads=cfg.num_heads,
            ffn_dim=cfg.model_dim,
            dropout=cfg.dropout,
            activation=cfg.activation,
            attn_bias=cfg.attn_bias,
            ffn_bias=cfg.fw_bias,
        )
        self.mu = CountHead(embed_dim, vocab_size, cfg.dropout)
        if loss_config.gene_id_loss_weight > 0:
            self.gene_id_head = MLP(embed_dim, cfg.gene_head_hidden_dim, vocab_size, cfg.dropout)
        else:
            self.gene_id_head = None
        # Gene-id head class of each vocabulary entry, -1 where the head has none; set by a gene-table swap
        # (transcriptformer.model.gene_swap). None: the vocabulary is the one the head was trained on.
        self.register_buffer("gene_head_classes", None, persistent=False)

    @property
    def seq_len(self) -> int:
        """Gene positions of a full-length cell."""
        return self.model_config.seq_len

    @property
    def output_keys(self) -> tuple[str, ...]:
        """The outputs this model computes (those of the gene-id head need one)."""
        return available_outputs(("count", "gene_id") if self.gene_id_head is not None else ("count",))

    def length_multiple(self, device: torch.device) -> int:
        """Multiple that batch lengths are rounded up to on ``device`` (the flex block size, or 1)."""
        return preferred_length_multiple(self.attention_backend, device)

    def shifted_inputs(self, gene_tokens: Tensor, gene_counts: Tensor) -> tuple[Tensor, Tensor]:
        """Shift right: ``[START], t[:, :-1]`` and ``1, c[:, :-1]``."""
        start = torch.full_like(gene_tokens[:, :1], self.special_tokens.start)
        tokens = torch.cat([start, gene_tokens[:, :-1]], dim=1)
        counts = torch.cat([torch.ones_like(gene_counts[:, :1]), gene_counts[:, :-1]], dim=1)
        return tokens, counts

    def forward(
        self,
        gene_tokens: Tensor,
        gene_counts: Tensor,
        aux_tokens: Tensor | None = None,
        *,
        embed_mode: bool = True,
        compute_mu: bool = True,
        compute_gene_logits: bool = True,
        embedding_layer_index: int = -1,
    ) -> ModelOutput:
        """Run the model.

        Parameters
        ----------
        gene_tokens : Tensor
            ``(B, L)`` long, vocabulary indices, ``[PAD]`` after the cell's genes.
        gene_counts : Tensor
            ``(B, L)`` float counts (0 at padding).
        aux_tokens : Tensor, optional
            ``(B, A)`` long, one token per aux column; required when the model has aux columns.
        embed_mode : bool
            Inference mode of the original (count bias on the attention diagonal); ``False`` for training.
        compute_mu, compute_gene_logits : bool
            Skip a head whose output is not needed.
        embedding_layer_index : int
            The layer whose output the cell embedding pools (0 the first, negative from the end); the heads always
            read the last layer's. Default: the last layer, as the original release.
        """
        embedding_layer = self.layer_number(embedding_layer_index)
        gene_counts = gene_counts.float()
        in_tokens, in_counts = self.shifted_inputs(gene_tokens, gene_counts)
        x = self.gene_embeddings(in_tokens)  # (B, L, E)
        is_pad = in_tokens == self.special_tokens.pad  # (B, L)
        counts = in_counts
        if self.aux_embeddings:
            aux_x, aux_is_pad = self._embed_aux(aux_tokens, gene_tokens.shape[0])
            x = torch.cat([aux_x, x], dim=1)  # (B, A + L, E)
            is_pad = torch.cat([aux_is_pad, is_pad], dim=1)
            counts = torch.cat([torch.ones_like(aux_is_pad, dtype=counts.dtype), counts], dim=1)

        cfg = self.model_config
        attention = build_attention_inputs(
            counts,
            is_pad,
            eps=cfg.log_counts_eps,
            cap=cfg.softcap,
            embed_mode=embed_mode,
            backend=resolve_backend(self.attention_backend, x.device),
            block_size=cfg.block_len,
            block_masks=self.block_masks,
        )
        # 0 where the input is padding: what attention leaves there would depend on the batch mates.
        is_gene = ~is_pad[:, -gene_tokens.shape[1] :, None]  # (B, L, 1)
        for layer, output in enumerate(self.transformer_encoder.layer_outputs(x, attention)):
            if layer == embedding_layer:
                kept = output
        hidden = output[:, -gene_tokens.shape[1] :] * is_gene  # (B, L, E), the last layer's
        embedded = hidden if kept is output else kept[:, -gene_tokens.shape[1] :] * is_gene  # (B, L, E)
        out = ModelOutput(hidden=hidden, embeddings=embedded.sum(1) / cfg.seq_len)
        if compute_mu:
            out.mu = self.expected_counts(self.count_logits(hidden, gene_tokens), gene_tokens, gene_counts)
        if compute_gene_logits and self.gene_id_head is not None:
            out.gene_logits = self.gene_id_head(hidden)
        return out

    def layer_number(self, embedding_layer_index: int) -> int:
        """The layer (0 the first) that ``embedding_layer_index`` names: negative counts from the end.

        Raises
        ------
        ValueError
            When the model has no such layer.
        """
        layers = len(self.transformer_encoder.encoder_layers)
        if not -layers <= embedding_layer_index < layers:
            raise ValueError(
                f"embedding_layer_index={embedding_layer_index} names no layer of this model's {layers}: "
                f"use 0 to {layers - 1}, or -{layers} to -1 from the end"
            )
        return embedding_layer_index % layers

    def _embed_aux(self, aux_tokens: Tensor | None, batch_size: int) -> tuple[Tensor, Tensor]:
        """``(B, A, E)`` aux embeddings and ``(B, A)`` mask of unknown values."""
        if aux_tokens is None or aux_tokens.shape != (batch_size, len(self.aux_embeddings)):
            raise ValueError(
                f"this model needs aux_tokens of shape ({batch_size}, {len(self.aux_embeddings)}) for the columns "
                f"{list(self.aux_embeddings)}, got {None if aux_tokens is None else tuple(aux_tokens.shape)}"
            )
        embedded = [emb(aux_tokens[:, i]) for i, emb in enumerate(self.aux_embeddings.values())]
        unknown = torch.tensor(self.aux_unknown, device=aux_tokens.device)
        return torch.stack(embedded, dim=1), aux_tokens == unknown

    def expected_counts(self, count_logits: Tensor, gene_tokens: Tensor, gene_counts: Tensor) -> Tensor:
        """Count head: ``(B, L)`` logits -> ``(B, L)`` expected counts (``mu``), 0 at padding.

        The softmax of the logits over the cell's unpadded positions, times its total count.
        """
        logits = count_logits.masked_fill(gene_tokens == self.special_tokens.pad, -torch.inf)
        return torch.softmax(logits, dim=-1) * gene_counts.sum(-1, keepdim=True)

    def count_logits(self, hidden: Tensor, gene_tokens: Tensor) -> Tensor:
        """``(..., E)`` outputs and ``(...)`` the genes at their positions -> ``(...)`` float32 count-head logits.

        The expected counts of a cell are the softmax of its positions' logits times its total count.
        """
        return self.mu(hidden, self.gene_embeddings(gene_tokens), gene_tokens).float()

    def next_gene_logits(self, hidden: Tensor) -> Tensor:
        """``(B, E)`` outputs -> ``(B, V)`` float32 softcapped gene-id logits over the vocabulary's entries.

        The distribution of the next gene is their softmax. After a gene-table swap, an entry that the gene-id head
        has no class for gets ``-inf``.
        """
        logits = softcap(self.gene_id_head(hidden).float(), self.model_config.softcap)
        if self.gene_head_classes is None:
            return logits
        classes = self.gene_head_classes
        return logits[:, classes.clamp(min=0)].masked_fill(classes < 0, -torch.inf)

    def start_decoding(self, aux_tokens: Tensor | None, batch_size: int, capacity: int) -> tuple[KVCache, Tensor]:
        """Begin generating ``batch_size`` cells: run the aux tokens and ``[START]`` into a new key/value cache.

        Parameters
        ----------
        aux_tokens
            ``(B, A)`` the cells' aux tokens, when the model has aux columns.
        capacity
            Gene positions to decode at most.

        Returns
        -------
        KVCache, Tensor
            The cache, and the ``(B, E)`` output at ``[START]``, which predicts the first gene.
        """
        device = self.gene_embeddings.embedding.weight.device
        start = torch.full((batch_size, 1), self.special_tokens.start, device=device)
        x, is_pad, counts = self.gene_embeddings(start), torch.zeros_like(start, dtype=torch.bool), torch.ones(1, 1)
        counts = counts.to(device).expand(batch_size, 1)
        if self.aux_embeddings:
            aux_x, aux_is_pad = self._embed_aux(aux_tokens, batch_size)
            x, is_pad = torch.cat([aux_x, x], dim=1), torch.cat([aux_is_pad, is_pad], dim=1)
            counts = torch.cat([torch.ones_like(aux_is_pad, dtype=counts.dtype), counts], dim=1)
        cfg = self.model_config
        cache = KVCache(
            cfg.num_layers, batch_size, cfg.num_heads, cfg.embed_dim // cfg.num_heads, capacity + x.shape[1], x
        )
        return cache, self._decode_positions(x, counts, is_pad, cache)[:, -1]

    def decode(self, gene_tokens: Tensor, gene_counts: Tensor, cache: KVCache) -> Tensor:
        """Add one gene to each cell of ``cache``: ``(B,)`` tokens and counts -> ``(B, E)`` output at that position.

        The output predicts the gene after it; it is 0 for ``[PAD]`` (a cell that has ended). Equals the last
        position of :meth:`forward` over all the genes so far (inference-mode attention), in one query per layer.
        """
        return self.decode_genes(gene_tokens[:, None], gene_counts[:, None], cache)[:, -1]

    def decode_genes(self, gene_tokens: Tensor, gene_counts: Tensor, cache: KVCache) -> Tensor:
        """Add ``T`` genes to each cell of ``cache``: ``(B, T)`` tokens and counts -> ``(B, T, E)`` outputs there.

        The output at gene ``t`` predicts the gene after it; it is 0 for ``[PAD]``. Equals those positions of
        :meth:`forward` over all the genes so far (inference-mode attention): the genes are the inputs of the
        positions that follow the cached ones, each attending to the cached positions and the genes before it.
        """
        x = self.gene_embeddings(gene_tokens)
        return self._decode_positions(x, gene_counts.float(), gene_tokens == self.special_tokens.pad, cache)

    def _decode_positions(self, x: Tensor, counts: Tensor, is_pad: Tensor, cache: KVCache) -> Tensor:
        """Run ``(B, T, E)`` inputs of new positions over the cached ones (inference mode); ``(B, T, E)`` outputs."""
        cfg = self.model_config
        cache.append(torch.log1p(counts + cfg.log_counts_eps), is_pad)
        attention = AttentionInputs(cache.count_bias, cache.kv_is_pad, cfg.softcap, embed_mode=True)
        return self.transformer_encoder(x, attention, cache) * ~is_pad[..., None]

    def likelihoods(self, out: ModelOutput, gene_tokens: Tensor, gene_counts: Tensor) -> dict[str, Tensor]:
        """Per-position count NLL and gene cross-entropy of a forward pass.

        Returns
        -------
        dict
            ``count_nll`` (when ``mu`` was computed) and ``gene_nll`` (when gene logits were), both ``(B, L)``
            and 0 at padded positions, plus ``mask`` ``(B, L)``, True at scored positions.
        """
        mask = gene_tokens != self.special_tokens.pad
        target_tokens, target_counts = next_token_targets(
            gene_tokens, gene_counts.float(), self.special_tokens.end, self.seq_len
        )
        result = {"mask": mask}
        if out.mu is not None:
            eps = self.model_config.log_counts_eps
            count_nll = zero_truncated_poisson_nll(out.mu, target_counts, eps, self.loss_config.softplus_approx)
            result["count_nll"] = torch.where(mask, count_nll, 0.0)
        if out.gene_logits is not None:
            result["gene_nll"] = self.gene_nll(out.gene_logits, target_tokens, mask)
        return result

    def gene_nll(self, gene_logits: Tensor, target_tokens: Tensor, mask: Tensor) -> Tensor:
        """Gene cross-entropy of ``(B, R, V)`` gene logits against ``(B, R)`` targets; 0 where ``mask`` is False.

        NaN for a target that the gene-id head has no class for (after a gene-table swap). The positions may be
        any ``R`` consecutive ones of the cells; their targets are those of :meth:`likelihoods`.
        """
        classes, has_class = self.gene_head_targets(target_tokens)
        gene_nll = gene_cross_entropy(gene_logits, classes, self.model_config.softcap)
        return torch.where(mask, torch.where(has_class, gene_nll, torch.nan), 0.0)

    def gene_head_targets(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Gene-id head class of each token and whether it has one (after a gene-table swap, new genes have none)."""
        if self.gene_head_classes is None:
            return tokens, torch.ones_like(tokens, dtype=torch.bool)
        classes = self.gene_head_classes[tokens]
        return classes.clamp(min=0), classes >= 0

    @torch.no_grad()
    def predict(
        self,
        gene_tokens: Tensor,
        gene_counts: Tensor,
        aux_tokens: Tensor | None,
        output_keys: Collection[str],
        embedding_layer_index: int = -1,
    ) -> dict[str, Tensor]:
        """Inference outputs of the original release, computing only the heads they need.

        Parameters
        ----------
        output_keys
            Names of :data:`~transcriptformer.model.outputs.OUTPUTS`, which describes each.
        embedding_layer_index
            The layer whose output ``embeddings`` pools; see :meth:`forward`.
        """
        check_output_keys(output_keys, self.output_keys)
        out = self(
            gene_tokens,
            gene_counts,
            aux_tokens,
            embed_mode=True,
            compute_mu=needs_head(output_keys, "count"),
            compute_gene_logits=needs_head(output_keys, "gene_id"),
            embedding_layer_index=embedding_layer_index,
        )
        return self.outputs(out, self.likelihoods(out, gene_tokens, gene_counts), output_keys)

    def outputs(self, out: ModelOutput, scores: dict[str, Tensor], output_keys: Collection[str]) -> dict[str, Tensor]:
        """The outputs ``output_keys`` (float32) of a forward pass and its :meth:`likelihoods`, as :meth:`predict`."""
        available = {
            "embeddings": lambda: out.embeddings,
            "llh": lambda: masked_mean(scores["count_nll"], scores["mask"]),
            "gene_llh": lambda: scores["gene_nll"],
            "mu": lambda: out.mu,
            "cge": lambda: out.hidden,
            **self.log_likelihoods(scores),
        }
        return {key: available[key]().float() for key in output_keys}

    @staticmethod
    def log_likelihoods(scores: dict[str, Tensor]) -> dict[str, Callable[[], Tensor]]:
        """The score outputs (``log_likelihood*``) of :meth:`likelihoods`' results, each computed when called.

        A position's log-likelihood is that of its gene's identity (the gene-id head's softmax, given the genes and
        counts before it) plus that of its count (the zero-truncated Poisson of the count head, given its gene):
        ``-gene_nll - count_nll``. A cell's is the sum over its positions; ``mean_log_likelihood`` divides it by
        the number of positions. Natural logarithms; 0 at padding.
        """
        mask = scores["mask"]
        per_position = {
            "gene_log_likelihood_gene_id": lambda: -scores["gene_nll"],
            "gene_log_likelihood_count": lambda: -scores["count_nll"],
            "gene_log_likelihood": lambda: -scores["gene_nll"] - scores["count_nll"],
        }
        per_cell = {
            "log_likelihood_gene_id": lambda: per_position["gene_log_likelihood_gene_id"]().sum(-1),
            "log_likelihood_count": lambda: per_position["gene_log_likelihood_count"]().sum(-1),
            "log_likelihood": lambda: per_position["gene_log_likelihood"]().sum(-1),
            "mean_log_likelihood": lambda: masked_mean(per_position["gene_log_likelihood"](), mask),
        }
        return per_position | per_cell
