"""The output layer of inference: per-unit files, reordering, obs of several files, atomic writes, gene lookup."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from transcriptformer.cli import main
from transcriptformer.inference import contextual_embeddings
from transcriptformer.inference.output import ChunkOutputs, concat_obs, write_output


@pytest.fixture(scope="module")
def api_outputs(reference_model, reference_input):
    return reference_model.predict(reference_input, output_keys=("embeddings", "llh", "mu", "gene_llh", "cge"))


@pytest.fixture(scope="module")
def chunk(api_outputs, reference_model):
    """The real outputs of the first 10 cells, keyed by gene."""
    tokens = api_outputs["gene_token_indices"][:10]
    is_gene = tokens != reference_model.model.special_tokens.pad
    columns = np.where(is_gene, tokens - 7, 0)  # a gene axis in vocabulary order
    return ChunkOutputs.from_positions(
        cell_values={k: api_outputs[k][:10] for k in ("embeddings", "llh")},
        position_values={k: api_outputs[k][:10] for k in ("mu", "gene_llh", "cge")},
        columns=columns,
        scored={"mu": is_gene, "gene_llh": is_gene, "cge": is_gene},
        n_genes=len(reference_model.checkpoint.gene_vocab) - 7,
    )


def assert_equal_chunks(a: ChunkOutputs, b: ChunkOutputs) -> None:
    assert a.n_cells == b.n_cells
    for key in a.cell_values:
        np.testing.assert_array_equal(a.cell_values[key], b.cell_values[key])
    for key in a.gene_values:
        assert (a.gene_values[key] != b.gene_values[key]).nnz == 0
    for key in a.cge:
        np.testing.assert_array_equal(a.cge[key], b.cge[key])


def test_chunk_keys_positions_by_gene(chunk, api_outputs):
    tokens = api_outputs["gene_token_indices"][:10]
    cell, position = 3, 5
    gene = tokens[cell, position] - 7
    assert chunk.gene_values["mu"][cell, gene] == api_outputs["mu"][cell, position]
    assert chunk.gene_values["mu"].nnz == (tokens != 1).sum()
    first = chunk.cge["cell_index"] == cell
    np.testing.assert_array_equal(chunk.cge["embeddings"][first][position], api_outputs["cge"][cell, position])


def test_chunk_file_round_trip(chunk, tmp_path):
    chunk.save(tmp_path / "unit.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["unit.npz"]
    assert_equal_chunks(ChunkOutputs.load(tmp_path / "unit.npz"), chunk)


def test_reordering_and_stacking(chunk):
    order = np.array([4, 0, 9, 1, 2, 3, 5, 6, 7, 8])
    taken = chunk.take(order)
    np.testing.assert_array_equal(taken.cell_values["embeddings"], chunk.cell_values["embeddings"][order])
    assert (taken.gene_values["mu"] != chunk.gene_values["mu"][order]).nnz == 0
    assert np.all(np.diff(taken.cge["cell_index"]) >= 0)
    firsts = taken.cge["embeddings"][taken.cge["cell_index"] == 0]
    np.testing.assert_array_equal(firsts, chunk.cge["embeddings"][chunk.cge["cell_index"] == 4])
    assert_equal_chunks(taken.take(np.argsort(order)), chunk)
    halves = ChunkOutputs.concat([chunk.take(np.arange(4)), chunk.take(np.arange(4, 10))])
    assert_equal_chunks(halves, chunk)


def test_obs_of_several_files_keep_every_value_and_can_be_written(tmp_path):
    first = pd.DataFrame({"good": [True, False], "n": [1, 2], "label": ["a", "b"]}, index=["c1", "c2"])
    second = pd.DataFrame({"n": ["x", "y"], "label": pd.Categorical(["b", "z"])}, index=["c3", "c1"])
    obs = concat_obs([first, second])
    assert list(obs.index) == ["c1", "c2", "c3", "c1"]
    assert obs["good"].dtype == "boolean" and obs["good"].isna().tolist() == [False, False, True, True]
    assert obs["n"].tolist() == ["1", "2", "x", "y"]
    assert obs["label"].tolist() == ["a", "b", "b", "z"]
    outputs = ChunkOutputs(n_cells=4, cell_values={"embeddings": np.zeros((4, 2), np.float32)})
    write_output(tmp_path / "out.h5ad", obs, pd.Index([], name="gene_id"), [outputs], {"package_version": "test"})
    with pytest.warns(UserWarning, match="Observation names are not unique"):  # kept as the inputs had them
        back = ad.read_h5ad(tmp_path / "out.h5ad")
    assert back.obs["good"].tolist()[:2] == [True, False] and back.obs["good"].isna().sum() == 2


def test_file_written_chunk_by_chunk_holds_every_output(chunk, tmp_path, reference_model):
    obs = pd.DataFrame({"label": list("abcdefghij")}, index=[f"cell{i}" for i in range(10)])
    genes = pd.Index(reference_model.checkpoint.gene_vocab.gene_ids, name="gene_id")
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
        write_output(target, obs, pd.Index([]), [ChunkOutputs(10, dict(chunk.cell_values))], {}, overwrite=False)
    assert target.read_bytes() == b"an earlier result"
    write_output(target, obs, pd.Index([]), [ChunkOutputs(10, dict(chunk.cell_values))], {}, overwrite=True)
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
