"""Outputs keyed by gene, per-unit files, reordering, obs of several files, atomic writes, gene lookup."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from transcriptformer.cli import main
from transcriptformer.config import PredictSettings
from transcriptformer.inference import contextual_embeddings
from transcriptformer.inference.output import concat_obs, write_output
from transcriptformer.inference.parts import load_part, save_part
from transcriptformer.model.outputs import OUTPUT_KEYS, end_target_position
from transcriptformer.pipeline import GeneOutputs, predict_gene_outputs


@pytest.fixture(scope="module")
def api_outputs(reference_model, reference_input):
    return reference_model.predict(reference_input, output_keys=OUTPUT_KEYS)


@pytest.fixture(scope="module")
def n_special(reference_model):
    return len(reference_model.checkpoint.gene_vocab.special_tokens)


@pytest.fixture(scope="module")
def chunk(reference_model, reference_input, n_special):
    """The real outputs of the first 10 cells, keyed by gene on a gene axis in vocabulary order."""
    cells = reference_model.tokenize(ad.read_h5ad(reference_input)[:10].copy())
    vocab_index = np.arange(len(reference_model.checkpoint.gene_vocab))
    gene_columns = np.where(vocab_index >= n_special, vocab_index - n_special, -1)
    settings = PredictSettings(OUTPUT_KEYS, batch_size=3)
    return predict_gene_outputs(reference_model.model, cells, settings, torch.device("cpu"), gene_columns)


def assert_equal_chunks(a: GeneOutputs, b: GeneOutputs) -> None:
    assert a.n_cells == b.n_cells
    for key in a.cell_values:
        np.testing.assert_array_equal(a.cell_values[key], b.cell_values[key])
    for key in a.gene_values:
        assert (a.gene_values[key] != b.gene_values[key]).nnz == 0
    for key in a.cge:
        np.testing.assert_array_equal(a.cge[key], b.cge[key])


def test_chunk_keys_positions_by_gene(chunk, api_outputs, reference_model, n_special):
    tokens = api_outputs["gene_token_indices"][:10]
    holds_gene = tokens != reference_model.model.special_tokens.pad
    cell, position = 3, 5
    gene = tokens[cell, position] - n_special
    for key in ("mu", "gene_llh"):
        assert chunk.gene_values[key][cell, gene] == api_outputs[key][cell, position]
    assert chunk.gene_values["mu"].nnz == holds_gene.sum()
    first = chunk.cge["cell_index"] == cell
    np.testing.assert_array_equal(chunk.cge["embeddings"][first][position], api_outputs["cge"][cell, position])


def test_the_end_target_position_holds_no_gene_llh(reference_model, reference_input, n_special):
    """A full-length cell's last position is scored against [END]: its gene gets no gene_llh, but a mu."""
    model = reference_model.model
    cells = reference_model.tokenize(reference_input)
    full = np.flatnonzero(cells.n_tokens() == cells.seq_len)
    assert full.size  # the reference cells include full-length ones
    vocab_index = np.arange(len(reference_model.checkpoint.gene_vocab))
    gene_columns = np.where(vocab_index >= n_special, vocab_index - n_special, -1)
    outputs = predict_gene_outputs(model, cells, PredictSettings(("mu", "gene_llh")), torch.device("cpu"), gene_columns)
    last_gene = cells.batch(full).gene_tokens[:, end_target_position(cells.seq_len)].numpy() - n_special
    assert (outputs.gene_values["gene_llh"][full, last_gene] == 0).all()
    assert (outputs.gene_values["mu"][full, last_gene] != 0).all()
    per_cell = np.diff(outputs.gene_values["gene_llh"].indptr)
    assert (per_cell[full] == cells.seq_len - 1).all()


def test_chunk_file_round_trip(chunk, tmp_path):
    save_part(chunk, tmp_path / "unit.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["unit.npz"]
    assert_equal_chunks(load_part(tmp_path / "unit.npz"), chunk)


def test_reordering_and_stacking(chunk):
    order = np.array([4, 0, 9, 1, 2, 3, 5, 6, 7, 8])
    taken = chunk.take(order)
    np.testing.assert_array_equal(taken.cell_values["embeddings"], chunk.cell_values["embeddings"][order])
    assert (taken.gene_values["mu"] != chunk.gene_values["mu"][order]).nnz == 0
    assert np.all(np.diff(taken.cge["cell_index"]) >= 0)
    firsts = taken.cge["embeddings"][taken.cge["cell_index"] == 0]
    np.testing.assert_array_equal(firsts, chunk.cge["embeddings"][chunk.cge["cell_index"] == 4])
    assert_equal_chunks(taken.take(np.argsort(order)), chunk)
    halves = GeneOutputs.concat([chunk.take(np.arange(4)), chunk.take(np.arange(4, 10))])
    assert_equal_chunks(halves, chunk)


def test_obs_of_several_files_keep_every_value_and_can_be_written(tmp_path):
    first = pd.DataFrame({"good": [True, False], "n": [1, 2], "label": ["a", "b"]}, index=["c1", "c2"])
    second = pd.DataFrame({"n": ["x", "y"], "label": pd.Categorical(["b", "z"])}, index=["c3", "c1"])
    obs = concat_obs([first, second])
    assert list(obs.index) == ["c1", "c2", "c3", "c1"]
    assert obs["good"].dtype == "boolean" and obs["good"].isna().tolist() == [False, False, True, True]
    assert obs["n"].tolist() == ["1", "2", "x", "y"]
    assert obs["label"].tolist() == ["a", "b", "b", "z"]
    outputs = GeneOutputs(n_cells=4, cell_values={"embeddings": np.zeros((4, 2), np.float32)})
    write_output(tmp_path / "out.h5ad", obs, pd.Index([], name="gene_id"), [outputs], {"package_version": "test"})
    with pytest.warns(UserWarning, match="Observation names are not unique"):  # kept as the inputs had them
        back = ad.read_h5ad(tmp_path / "out.h5ad")
    assert back.obs["good"].tolist()[:2] == [True, False] and back.obs["good"].isna().sum() == 2


def test_file_written_chunk_by_chunk_holds_every_output(chunk, tmp_path, reference_model):
    obs = pd.DataFrame({"label": list("abcdefghij")}, index=[f"cell{i}" for i in range(10)])
    genes = pd.Index(reference_model.checkpoint.gene_vocab.gene_ids, name="gene_id")  # the chunk's gene axis
    halves = [chunk.take(np.arange(3)), chunk.take(np.arange(3, 10))]
    write_output(tmp_path / "out.h5ad", obs, genes, iter(halves), {"package_version": "test"})
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    assert list(back.obs_names) == list(obs.index) and list(back.obs["label"]) == list(obs["label"])
    assert list(back.var_names) == list(genes)
    np.testing.assert_array_equal(back.obsm["embeddings"], chunk.cell_values["embeddings"])
    np.testing.assert_array_equal(back.obs["llh"], chunk.cell_values["llh"])
    np.testing.assert_array_equal(back.uns["llh"]["llh"], chunk.cell_values["llh"])
    for key in ("mu", "gene_llh"):
        assert (back.layers[key] != chunk.gene_values[key]).nnz == 0
    for key in ("embeddings", "cell_index", "gene_index"):
        np.testing.assert_array_equal(back.uns["cge"][key], chunk.cge[key])
    assert back.uns["transcriptformer"]["package_version"] == "test"


def test_output_rows_must_match_obs(chunk, tmp_path):
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(12)])
    with pytest.raises(ValueError, match="10 cells of outputs for 12 rows of obs"):
        write_output(tmp_path / "out.h5ad", obs, pd.Index([]), [chunk], {})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_an_existing_file(chunk, tmp_path):
    target = tmp_path / "out.h5ad"
    target.write_bytes(b"an earlier result")
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(10)])
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        write_output(target, obs, pd.Index([]), [GeneOutputs(10, dict(chunk.cell_values))], {}, overwrite=False)
    assert target.read_bytes() == b"an earlier result"
    write_output(target, obs, pd.Index([]), [GeneOutputs(10, dict(chunk.cell_values))], {}, overwrite=True)
    assert ad.read_h5ad(target).n_obs == 10
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5ad"]


def test_contextual_embeddings_of_one_gene(reference_dir, reference_input, reference_model, api_outputs, tmp_path):
    args = ["inference", "--checkpoint-path", str(reference_dir), "--data-file", str(reference_input)]
    assert main([*args, "--output-path", str(tmp_path), "--emb-type", "cge"]) == 0
    adata = ad.read_h5ad(tmp_path / "embeddings.h5ad")
    gene = adata.var_names[10]
    cells, embeddings = contextual_embeddings(adata, gene)
    tokens = api_outputs["gene_token_indices"]
    rows, positions = np.nonzero(tokens == reference_model.checkpoint.gene_vocab[gene])
    assert list(cells) == list(adata.obs_names[rows]) and len(cells) > 1
    np.testing.assert_array_equal(embeddings, api_outputs["cge"][rows, positions])
    with pytest.raises(KeyError, match="--emb-type cge"):
        contextual_embeddings(ad.AnnData(obs=adata.obs, var=adata.var), gene)
