"""Row-block readers: backed h5ad, zarr and 10x h5 give the counts of the in-memory AnnData."""

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from transcriptformer.data.sources import AnnDataReader, H5adReader, TenXH5Reader, ZarrReader, open_counts

TENX_FILE = Path(__file__).parent / "data" / "10x_v3_chr21_1107cells.h5"


@pytest.fixture
def adata(reference_input):
    return ad.read_h5ad(reference_input)


def read_in_blocks(reader, block):
    return sp.vstack([reader.rows(s, min(s + block, reader.n_obs)) for s in range(0, reader.n_obs, block)])


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_file_readers_match_memory(tmp_path, adata, suffix):
    path = tmp_path / f"cells{suffix}"
    adata.write_h5ad(path) if suffix == ".h5ad" else adata.write_zarr(path)
    with open_counts(path) as reader:
        assert isinstance(reader, H5adReader if suffix == ".h5ad" else ZarrReader)
        assert reader.n_obs == 64 and list(reader.obs.index) == list(adata.obs_names)
        assert list(reader.var["ensembl_id"]) == list(adata.var["ensembl_id"])
        blocks = read_in_blocks(reader, 9)
    assert (blocks != adata.X).nnz == 0


def test_backed_reader_prefers_raw(tmp_path, adata):
    normalised = adata.copy()
    normalised.raw = adata
    normalised.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    normalised.var["ensembl_id"] = [f"other-{i}" for i in range(adata.n_vars)]
    path = tmp_path / "normalised.h5ad"
    normalised.write_h5ad(path)
    with open_counts(path) as reader:
        assert (reader.rows(0, 64) != adata.X).nnz == 0
        assert list(reader.var["ensembl_id"]) == list(adata.var["ensembl_id"])
    with open_counts(path, use_raw=False) as reader:
        assert reader.var["ensembl_id"].iloc[0] == "other-0"
    adata.write_h5ad(tmp_path / "plain.h5ad")
    with pytest.raises(ValueError, match="use_raw=True but .*plain.h5ad has no raw/X"):
        open_counts(tmp_path / "plain.h5ad", use_raw=True)


def test_dense_backed_matrix(tmp_path, adata):
    dense = adata.copy()
    dense.X = adata.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    with open_counts(tmp_path / "dense.h5ad") as reader:
        assert (read_in_blocks(reader, 10) != adata.X).nnz == 0


def test_tenx_h5_reader():
    with h5py.File(TENX_FILE) as f:
        g = f["matrix"]
        n_genes, n_cells = g["shape"][:]
        by_gene = sp.csc_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=(n_genes, n_cells))
        gene_ids = g["features/id"][:].astype(str)
    with open_counts(TENX_FILE) as reader:
        assert isinstance(reader, TenXH5Reader)
        assert reader.n_obs == 1107 and len(reader.var) == 507
        assert list(reader.var["ensembl_id"]) == list(gene_ids)
        assert (read_in_blocks(reader, 100) != by_gene.T.tocsr()).nnz == 0


def test_unsupported_or_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_counts(tmp_path / "absent.h5ad")
    (tmp_path / "cells.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        open_counts(tmp_path / "cells.csv")
    with pytest.raises(ValueError, match="has no raw matrix"):
        open_counts(TENX_FILE, use_raw=True)


def test_streamed_chunks_equal_whole_tokenization(tmp_path, reference_model, adata):
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    ckpt = reference_model.checkpoint
    tokenizer = ckpt.tokenizer()
    whole = tokenizer.prepare(AnnDataReader(adata)).cells()
    with open_counts(path) as reader:
        prepared = tokenizer.prepare(reader)
        chunks = list(prepared.chunks(10))
    assert [start for start, _ in chunks] == list(range(0, 64, 10))
    batch = whole.batch(np.arange(64))
    for start, cells in chunks:
        part = cells.batch(np.arange(len(cells)))
        assert np.array_equal(part.gene_tokens, batch.gene_tokens[start : start + len(cells)])
        assert np.array_equal(part.gene_counts, batch.gene_counts[start : start + len(cells)])
        assert list(cells.obs_names) == list(adata.obs_names[start : start + len(cells)])
