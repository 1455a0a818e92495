"""The installed ``transcriptformer inference`` command, run as a user runs it, checked against the Python API."""

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import transcriptformer

OUTPUT_KEYS = ("embeddings", "llh", "gene_llh", "mu", "cge")


def installed_cli() -> str:
    script = Path(sys.executable).parent / "transcriptformer"
    assert script.exists(), f"the console script is not installed next to {sys.executable}"
    return str(script)


def test_cli_predict_smoke(tmp_path, reference_dir, reference_input, reference_model, expected):
    command = [installed_cli(), "inference", "--checkpoint-path", str(reference_dir), "--data-file"]
    command += [str(reference_input), "--output-keys", "embeddings", "llh", "gene_llh", "mu", "--emb-type", "cge"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    output = tmp_path / "inference_results" / "embeddings.h5ad"  # the default output path and file name
    assert f"Output: {output}" in done.stdout
    assert f"{reference_input}: 64 cells, 1024 of 1122 genes in the vocabulary" in done.stdout
    hidden = [p.name for p in output.parent.glob(".*")]
    assert hidden == [".embeddings.h5ad.lock"], "temporary files were left behind"  # the output's lock file stays

    adata = ad.read_h5ad(output)
    source = ad.read_h5ad(reference_input)
    api = reference_model.predict(reference_input, output_keys=OUTPUT_KEYS)

    # obs: the input's obs, names and order included, plus the run's columns
    pd.testing.assert_frame_equal(adata.obs[list(source.obs.columns)], source.obs)
    assert list(adata.obs.columns[-2:]) == ["source_file", "llh"]
    assert (adata.obs["source_file"] == str(reference_input)).all()

    # per-cell outputs
    np.testing.assert_array_equal(adata.obsm["X_transcriptformer"], api["embeddings"])
    np.testing.assert_array_equal(adata.obs["llh"], api["llh"])
    np.testing.assert_array_equal(adata.uns["llh"]["llh"], api["llh"])

    # per-gene outputs sit at (cell, gene id), whatever the gene's position in the cell's sequence
    tokens = api["gene_token_indices"]
    cells, positions = np.nonzero(tokens != reference_model.model.special_tokens.pad)
    vocab_ids = np.array(list(reference_model.checkpoint.gene_vocab.index))
    genes = adata.var_names.get_indexer(vocab_ids[tokens[cells, positions]])
    assert (genes >= 0).all()
    assert adata.layers["mu"].nnz == cells.size
    np.testing.assert_array_equal(adata.layers["mu"][cells, genes].A1, api["mu"][cells, positions])
    scored = positions != 126  # the last position of a full cell is scored against [END], not its gene
    gene_llh = adata.layers["gene_llh"][cells[scored], genes[scored]].A1
    np.testing.assert_array_equal(gene_llh, api["gene_llh"][cells[scored], positions[scored]])
    assert adata.layers["gene_llh"].nnz == scored.sum()

    # contextual gene embeddings: one row per (cell, gene), cells in order, genes in sequence order
    np.testing.assert_array_equal(adata.uns["cge_cell_indices"], cells)
    np.testing.assert_array_equal(adata.uns["cge_gene_names"], vocab_ids[tokens[cells, positions]])
    np.testing.assert_array_equal(adata.uns["cge_embeddings"], api["cge"][cells, positions])

    # and the numbers of the original implementation
    for key in ("embeddings", "llh"):
        scale = np.abs(expected[key]).max()
        np.testing.assert_allclose(api[key], expected[key], rtol=1e-4, atol=1e-4 * scale)

    metadata = adata.uns["transcriptformer"]
    assert metadata["package_version"] == transcriptformer.__version__
    assert metadata["checkpoint_path"] == str(reference_dir.resolve())
    assert len(metadata["weights_sha256"]) == 64
    assert metadata["precision"] == "32" and metadata["processes"] == 1
    assert list(metadata["genes_matched"]) == [1024]
