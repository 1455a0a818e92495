"""The Python API: load a checkpoint directory, run it on cells, get NumPy arrays."""

import anndata as ad
import numpy as np
import pytest
import torch

import transcriptformer


def test_load_and_predict_in_a_few_lines(reference_dir, reference_input, expected):
    model = transcriptformer.load(reference_dir, device="cpu")
    result = model.predict(reference_input, batch_size=16, output_keys=("embeddings", "llh"))
    assert set(result) == {"embeddings", "llh", "gene_token_indices", "gene_counts", "aux_token_indices"}
    assert isinstance(result["embeddings"], np.ndarray) and result["embeddings"].dtype == np.float32
    np.testing.assert_allclose(result["llh"], expected["llh"], rtol=1e-4)
    np.testing.assert_allclose(model.embed(reference_input), expected["embeddings"], rtol=1e-4, atol=1e-6)


def test_predict_accepts_pretokenized_cells_and_subsets(reference_model, reference_input, expected):
    adata = ad.read_h5ad(reference_input)[10:20].copy()
    cells = reference_model.tokenize(adata)
    result = reference_model.predict(cells, batch_size=3, output_keys=("mu",))
    np.testing.assert_allclose(result["mu"], expected["mu"][10:20], rtol=1e-4, atol=1e-6)


def test_bad_arguments(reference_model, reference_input, reference_dir):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        reference_model.predict(reference_input, batch_size=0)
    with pytest.raises(FileNotFoundError, match="not a TranscriptFormer checkpoint"):
        transcriptformer.load(reference_dir / "vocabs", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            transcriptformer.load(reference_dir, device="cuda")


def test_embed_fills_obsm_in_place_rows_follow_obs_names(reference_model, reference_input, expected):
    order = np.random.default_rng(0).permutation(ad.read_h5ad(reference_input).n_obs)[:25]
    adata = ad.read_h5ad(reference_input)[order].copy()  # a shuffled subset
    embeddings = reference_model.embed(adata)
    assert adata.obsm["X_transcriptformer"] is embeddings
    np.testing.assert_allclose(embeddings, expected["embeddings"][order], rtol=1e-4, atol=1e-6)
    first = ad.AnnData(adata.X[:5], obs=adata.obs[:5], var=adata.var)
    reference_model.embed(first, key_added="X_tf", batch_size=2)
    assert list(first.obsm) == ["X_tf"]
    np.testing.assert_allclose(first.obsm["X_tf"], embeddings[:5], rtol=1e-5, atol=1e-6)
    reference_model.embed(first, key_added=None)
    assert list(first.obsm) == ["X_tf"]


def test_embed_of_a_file_refuses_a_key(reference_model, reference_input):
    with pytest.raises(ValueError, match=r"key_added='X_mine' needs an AnnData.*pass anndata\.read_h5ad\(path\)"):
        reference_model.embed(reference_input, key_added="X_mine")


def test_embed_refuses_to_fill_obsm_when_filters_drop_cells(reference_model, reference_input):
    adata = ad.read_h5ad(reference_input)
    with pytest.warns(UserWarning, match="dropped"):
        with pytest.raises(ValueError, match=r"kept \d+ of 64 cells.*subset the AnnData first"):
            reference_model.embed(adata, min_expressed_genes=100)
    assert "X_transcriptformer" not in adata.obsm
    with pytest.warns(UserWarning, match="dropped"):
        kept = reference_model.embed(adata, key_added=None, min_expressed_genes=100)
    assert 0 < len(kept) < 64


def test_the_model_says_what_it_is(reference_model):
    n_parameters = sum(p.numel() for p in reference_model.model.parameters())
    assert repr(reference_model) == (
        f"TranscriptFormerModel(reference_tiny: {n_parameters:,} parameters, "
        f"{len(reference_model.checkpoint.gene_vocab.gene_ids):,} genes of mus_musculus, on cpu)"
    )
