"""Model behaviour beyond the reference checkpoint: other shapes, no aux columns, no gene-id head."""

import pytest
import torch

from transcriptformer.config import LossConfig, ModelConfig
from transcriptformer.model.transcriptformer import SpecialTokens, TranscriptFormer

SPECIAL = SpecialTokens(pad=4, start=0, end=2)  # deliberately not the published order


def random_model(aux: bool, gene_head: bool, backend: str, seq_len: int = 150) -> TranscriptFormer:
    torch.manual_seed(0)
    config = ModelConfig(
        num_layers=2, num_heads=2, embed_dim=32, model_dim=48, seq_len=seq_len, gene_head_hidden_dim=16
    )
    aux_vocabs = {"assay": {"unknown": 0, "a": 1, "b": 2}, "tissue": {"x": 0, "unknown": 1}} if aux else {}
    model = TranscriptFormer(
        config,
        LossConfig(gene_id_loss_weight=1.0 if gene_head else 0.0),
        gene_table=torch.randn(60, 24),
        special_tokens=SPECIAL,
        aux_vocabs=aux_vocabs,
        attention_backend=backend,
    )
    return model.eval()


def random_cells(batch: int, seq_len: int, aux: bool):
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, seq_len + 1, (batch,), generator=gen)
    lengths[0] = seq_len  # one full-length cell: its last target is [END]
    tokens = torch.randint(7, 60, (batch, seq_len), generator=gen)
    counts = torch.randint(1, 30, (batch, seq_len), generator=gen).float()
    pad = torch.arange(seq_len)[None] >= lengths[:, None]
    tokens[pad], counts[pad] = SPECIAL.pad, 0.0
    aux_tokens = torch.tensor([[1, 0], [0, 1], [2, 0]])[torch.arange(batch) % 3] if aux else None
    return tokens, counts, aux_tokens


@pytest.mark.parametrize(("aux", "gene_head"), [(True, True), (False, False)])
def test_backends_agree_on_other_architectures(aux, gene_head):
    tokens, counts, aux_tokens = random_cells(5, 150, aux)
    keys = ("embeddings", "llh", "mu", "cge") + (("gene_llh",) if gene_head else ())
    flex = random_model(aux, gene_head, "flex").predict(tokens, counts, aux_tokens, output_keys=keys)
    chunked = random_model(aux, gene_head, "chunked").predict(tokens, counts, aux_tokens, output_keys=keys)
    for key in keys:
        assert torch.isfinite(chunked[key]).all(), key
        torch.testing.assert_close(flex[key], chunked[key], rtol=1e-4, atol=1e-5, msg=key)


def test_padding_never_changes_a_result():
    """A batch trimmed to one position past its longest cell gives the outputs of the full-length batch.

    The extra position matters: its shifted input is the cell's last gene, so it counts in the cell embedding.
    """
    model = random_model(aux=True, gene_head=True, backend="chunked")
    tokens, counts, aux_tokens = random_cells(4, 150, aux=True)
    tokens, counts, aux_tokens = tokens[1:], counts[1:], aux_tokens[1:]  # drop the full-length cell
    longest = int((tokens != SPECIAL.pad).sum(1).max()) + 1
    keys = ("embeddings", "llh", "gene_llh", "mu")
    full = model.predict(tokens, counts, aux_tokens, output_keys=keys)
    trimmed = model.predict(tokens[:, :longest], counts[:, :longest], aux_tokens, output_keys=keys)
    for key in ("embeddings", "llh"):
        torch.testing.assert_close(trimmed[key], full[key], rtol=1e-5, atol=1e-6, msg=key)
    for key in ("gene_llh", "mu"):
        torch.testing.assert_close(trimmed[key], full[key][:, :longest], rtol=1e-5, atol=1e-6, msg=key)
        assert torch.all(full[key][:, longest:] == 0)


def test_gene_llh_needs_a_gene_head():
    model = random_model(aux=False, gene_head=False, backend="chunked")
    tokens, counts, _ = random_cells(2, 150, aux=False)
    with pytest.raises(ValueError, match=r"this model cannot compute \['gene_llh'\]"):
        model.predict(tokens, counts, None, ("gene_llh",))
    with pytest.raises(ValueError, match=r"unknown output\(s\) \['embedding'\]"):
        model.predict(tokens, counts, None, ("embedding",))


def test_aux_tokens_are_required_with_aux_columns():
    model = random_model(aux=True, gene_head=True, backend="chunked")
    tokens, counts, _ = random_cells(2, 150, aux=False)
    with pytest.raises(ValueError, match=r"needs aux_tokens of shape \(2, 2\).*\['assay', 'tissue'\]"):
        model.predict(tokens, counts, None, ("embeddings",))


def test_training_mode_backpropagates_through_chunked_attention():
    model = random_model(aux=True, gene_head=True, backend="chunked").train()
    tokens, counts, aux_tokens = random_cells(3, 150, aux=True)
    out = model(tokens, counts, aux_tokens, embed_mode=False)
    scores = model.likelihoods(out, tokens, counts)
    loss = scores["count_nll"].sum() + scores["gene_nll"].sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.gene_embeddings.embedding.weight.grad is None  # the gene table stays frozen
