"""A cell's outputs depend on the cell alone: not on its batch mates, the batch size, the chunking or the input order.

Different batch shapes run different matrix-multiplication kernels, so values agree to float32 rounding (about 1e-7
relative), far below the 1e-4 at which the model is checked against the original; which positions and genes hold
a value agrees exactly. (Which process runs a cell changes nothing at all: see test_inference_distributed.py.)
"""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from transcriptformer.cli import main

ARGS = ("--output-keys", "embeddings", "llh", "gene_llh", "mu", "--emb-type", "cge")


def run(reference_dir, data_file, output, *extra) -> ad.AnnData:
    args = ["inference", "--checkpoint-path", str(reference_dir), "--data-file", str(data_file)]
    assert main([*args, "--output-path", str(output), *ARGS, *extra]) == 0
    return ad.read_h5ad(output / "embeddings.h5ad")


def assert_close(actual: np.ndarray, desired: np.ndarray, name: str) -> None:
    scale = np.abs(desired[np.isfinite(desired)]).max()
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-6 * scale, err_msg=name)


def cge_by_cell_and_gene(adata: ad.AnnData) -> tuple[pd.MultiIndex, np.ndarray]:
    pairs = pd.MultiIndex.from_arrays([adata.obs_names[adata.uns["cge_cell_indices"]], adata.uns["cge_gene_names"]])
    order = np.lexsort([pairs.get_level_values(1), pairs.get_level_values(0)])
    return pairs[order], adata.uns["cge_embeddings"][order]


def assert_same_cells(actual: ad.AnnData, desired: ad.AnnData) -> None:
    """Cell by cell (matched by name) and gene by gene (matched by id), whatever the order of either."""
    actual_pairs, actual_cge = cge_by_cell_and_gene(actual)  # uns indexes the file as written: before subsetting
    desired_pairs, desired_cge = cge_by_cell_and_gene(desired)
    assert actual_pairs.equals(desired_pairs)
    assert_close(actual_cge, desired_cge, "cge")
    actual = actual[desired.obs_names, desired.var_names]
    assert_close(actual.obsm["X_transcriptformer"], desired.obsm["X_transcriptformer"], "embeddings")
    assert_close(actual.obs["llh"].to_numpy(), desired.obs["llh"].to_numpy(), "llh")
    for layer in ("mu", "gene_llh"):
        got, want = actual.layers[layer].tocsr(), desired.layers[layer].tocsr()
        got.sort_indices()
        want.sort_indices()
        np.testing.assert_array_equal(got.indptr, want.indptr)
        np.testing.assert_array_equal(got.indices, want.indices)
        assert_close(got.data, want.data, layer)


@pytest.fixture(scope="module")
def one_batch(reference_dir, reference_input, tmp_path_factory):
    """All 64 cells in one forward pass."""
    return run(reference_dir, reference_input, tmp_path_factory.mktemp("one_batch"), "--batch-size", "64")


@pytest.mark.parametrize(
    "batching",
    [
        ("--batch-size", "1"),
        ("--batch-size", "7"),
        ("--config-override", "model.inference_config.max_tokens=300"),
        ("--config-override", "model.inference_config.chunk_size=5"),
    ],
    ids=["alone", "batches-of-7", "token-budget", "units-of-5"],
)
def test_outputs_do_not_depend_on_batching(reference_dir, reference_input, one_batch, tmp_path, batching):
    assert_same_cells(run(reference_dir, reference_input, tmp_path, *batching), one_batch)


def test_outputs_do_not_depend_on_input_order_or_batch_mates(reference_dir, reference_input, one_batch, tmp_path):
    cells = ad.read_h5ad(reference_input)
    shuffled = cells[np.random.default_rng(0).permutation(cells.n_obs)].copy()
    shuffled.write_h5ad(tmp_path / "shuffled.h5ad")
    result = run(reference_dir, tmp_path / "shuffled.h5ad", tmp_path / "out", "--batch-size", "5")
    assert list(result.obs_names) == list(shuffled.obs_names)  # the output keeps the input's order
    assert_same_cells(result, one_batch)
