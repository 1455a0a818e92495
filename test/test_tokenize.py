"""AnnData -> tokens on real cells (SPEC section 4)."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp


@pytest.fixture
def adata(reference_input):
    return ad.read_h5ad(reference_input)


@pytest.fixture
def tokenize(reference_model):
    """Tokenize with the reference checkpoint's tokenizer, with some of its data_config settings changed."""

    def run(data, use_raw=None, remove_duplicate_genes=False, **data_config):
        tokenizer = reference_model.checkpoint.tokenizer(remove_duplicate_genes=remove_duplicate_genes, **data_config)
        return tokenizer.tokenize(data, use_raw)

    return run


def full_batch(cells):
    return cells.batch(np.arange(len(cells)))


def test_reference_preprocessing_from_path_or_object(tokenize, reference_input, adata, expected):
    for data in (reference_input, adata):
        batch = full_batch(tokenize(data))
        np.testing.assert_array_equal(batch.gene_tokens.numpy(), expected["gene_token_indices"])
        np.testing.assert_array_equal(batch.gene_counts.numpy(), expected["gene_counts"])
        np.testing.assert_array_equal(batch.aux_tokens.numpy(), expected["aux_token_indices"])


def test_missing_file_is_a_clear_error(tokenize, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        tokenize(tmp_path / "absent.h5ad")


def test_counts_stay_sparse_and_lose_nothing(tokenize, adata):
    cells = tokenize(adata)
    assert sp.issparse(cells.counts) and cells.counts.shape == (64, 1024)
    kept = np.isin(adata.var["ensembl_id"].to_numpy(), cells.gene_ids)
    assert cells.counts.nnz == adata.X[:, kept].nnz
    assert np.array_equal(cells.obs_names, adata.obs_names)
    dense = adata.copy()
    dense.X = adata.X.toarray()
    assert np.array_equal(full_batch(tokenize(dense)).gene_tokens, full_batch(cells).gene_tokens)


def test_raw_counts_and_their_gene_ids_are_used_when_present(tokenize, adata, expected):
    normalised = adata.copy()
    normalised.raw = adata
    normalised.X = sp.csr_matrix(np.log1p(adata.X.toarray() / 7.3))
    normalised.var["ensembl_id"] = [f"not-an-id-{i}" for i in range(adata.n_vars)]  # ids must come from raw.var
    batch = full_batch(tokenize(normalised))
    np.testing.assert_array_equal(batch.gene_tokens.numpy(), expected["gene_token_indices"])
    np.testing.assert_array_equal(batch.gene_counts.numpy(), expected["gene_counts"])
    with pytest.raises(ValueError, match="none of the 1122 genes"):
        tokenize(normalised, use_raw=False)
    with pytest.raises(ValueError, match="use_raw=True but the AnnData has no .raw"):
        tokenize(adata, use_raw=True)


def test_non_integer_counts_warn(tokenize, adata):
    scaled = adata.copy()
    scaled.X = adata.X * 0.5
    with pytest.warns(UserWarning, match="expects raw counts"):
        tokenize(scaled)


def test_version_suffixes_are_dropped(tokenize, adata, expected):
    adata.var["ensembl_id"] = adata.var["ensembl_id"].astype(str) + ".12"
    np.testing.assert_array_equal(full_batch(tokenize(adata)).gene_tokens.numpy(), expected["gene_token_indices"])


def test_duplicate_ids_are_named_or_first_kept(tokenize, adata):
    ids = adata.var["ensembl_id"].astype(str).to_numpy().copy()
    ids[10] = ids[3] + ".2"  # collides after version stripping
    adata.var["ensembl_id"] = ids
    with pytest.raises(ValueError, match=rf"1 gene id\(s\) occur more than once.*{ids[3]}.*remove_duplicate_genes"):
        tokenize(adata)
    first_kept = full_batch(tokenize(adata, remove_duplicate_genes=True))
    without_second = full_batch(tokenize(adata[:, np.arange(adata.n_vars) != 10].copy()))
    assert np.array_equal(first_kept.gene_tokens, without_second.gene_tokens)
    assert np.array_equal(first_kept.gene_counts, without_second.gene_counts)


def test_missing_and_empty_ids_are_dropped(tokenize, adata):
    ids = adata.var["ensembl_id"].astype(object).to_numpy().copy()
    ids[[0, 1, 2]] = [np.nan, "", None]
    adata.var["ensembl_id"] = ids
    cells = tokenize(adata)
    reference = tokenize(adata[:, 3:].copy())
    assert np.array_equal(cells.gene_ids, reference.gene_ids)
    assert np.array_equal(full_batch(cells).gene_tokens, full_batch(reference).gene_tokens)


def test_vocabulary_filtering(tokenize, adata):
    with pytest.raises(ValueError, match=r"98 gene\(s\) are not in the model's vocabulary"):
        tokenize(adata, filter_to_vocabs=False)
    cells = tokenize(adata)
    assert len(cells.gene_ids) == 1024 and np.all(cells.gene_tokens >= 7)


def test_gene_column_choice(tokenize, adata, expected):
    # var names that are no gene ids: the message names the columns that hold ids (Ensembl ids or symbols)
    with pytest.raises(KeyError, match="'gene_symbol' not in var.*pass .*`gene_col_name='ensembl_id'`"):
        tokenize(adata, gene_col_name="gene_symbol")
    adata.var_names = adata.var["ensembl_id"].astype(str)
    batch = full_batch(tokenize(adata, gene_col_name="index"))
    np.testing.assert_array_equal(batch.gene_tokens.numpy(), expected["gene_token_indices"])
    # var names of gene ids are read when the column is missing, then feature_id when there is one
    without = full_batch(tokenize(adata, gene_col_name="gene_symbol"))
    np.testing.assert_array_equal(without.gene_tokens.numpy(), expected["gene_token_indices"])
    adata.var["feature_id"], adata.var_names = adata.var["ensembl_id"], [f"g{i}" for i in range(adata.n_vars)]
    from_feature_id = full_batch(tokenize(adata, gene_col_name="gene_symbol"))
    np.testing.assert_array_equal(from_feature_id.gene_tokens.numpy(), expected["gene_token_indices"])


def test_without_pad_zeros_unexpressed_genes_fill_in_var_order(tokenize, adata):
    cells = tokenize(adata, pad_zeros=False)
    batch = full_batch(cells)
    assert not np.any(batch.gene_tokens.numpy() == 1)
    row = int(np.argmin(np.diff(cells.counts.indptr)))  # the cell with fewest expressed genes
    n_expressed = int(np.diff(cells.counts.indptr)[row])
    zeros = batch.gene_counts[row, n_expressed:].numpy()
    assert np.all(zeros == 0) and np.all(batch.gene_counts[row, :n_expressed].numpy() > 0)
    unexpressed = np.setdiff1d(np.arange(cells.counts.shape[1]), cells.counts[row].indices)
    np.testing.assert_array_equal(
        batch.gene_tokens[row, n_expressed:], cells.gene_tokens[unexpressed][: 127 - n_expressed]
    )


def test_sort_genes_orders_by_count(tokenize, adata):
    batch = full_batch(tokenize(adata, sort_genes=True, clip_counts=None))
    counts = batch.gene_counts.numpy()
    assert np.all(np.diff(counts, axis=1) <= 0)


def test_normalisation_then_clipping(tokenize, adata):
    long = np.diff(adata.X.indptr) > 127  # cells with more expressed genes than the sequence holds
    assert long.any()
    raw = full_batch(tokenize(adata, clip_counts=None)).gene_counts.numpy()
    counts = full_batch(tokenize(adata, normalize_to_scale=1000.0, clip_counts=None)).gene_counts.numpy()
    # The original release normalises over the genes kept after cutting to seq_len, long cells included.
    np.testing.assert_allclose(counts.sum(1), 1000.0, rtol=1e-5)
    np.testing.assert_allclose(counts, raw / raw.sum(1, keepdims=True) * 1000.0, rtol=1e-5)
    clipped = full_batch(tokenize(adata, clip_counts=5)).gene_counts
    unclipped = full_batch(tokenize(adata, clip_counts=None)).gene_counts
    assert clipped.max() == 5 and unclipped.max() > 30
    np.testing.assert_array_equal(clipped.numpy(), np.minimum(unclipped.numpy(), 5))


def test_aux_values(tokenize, adata):
    adata.obs["assay"] = adata.obs["assay"].astype(str)
    adata.obs.iloc[:3, adata.obs.columns.get_loc("assay")] = ["10x 3' v3", "Smart-seq2", "never-seen assay"]
    aux = tokenize(adata).aux_tokens[:, 0]
    assert aux[:4].tolist() == [1, 3, 0, 2]
    del adata.obs["assay"]
    with pytest.warns(UserWarning, match="aux column 'assay' not in obs"):
        cells = tokenize(adata)
    assert np.all(cells.aux_tokens == 0)
