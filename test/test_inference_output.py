"""Outputs keyed by gene, per-unit files, reordering, obs of several files, atomic writes, gene lookup, layout.

The layout is checked with what users run on it: scanpy's common calls, and code written for the original release.
"""

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch

from transcriptformer.cli import main
from transcriptformer.config import PredictConfig
from transcriptformer.engine import contextual_embeddings
from transcriptformer.engine.output import concat_frames, write_output
from transcriptformer.engine.parts import load_part, save_part
from transcriptformer.engine.task import Part
from transcriptformer.model.outputs import MAIN_MATRIX_ORDER, OUTPUT_KEYS, OUTPUTS, end_target_position
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
    settings = PredictConfig(OUTPUT_KEYS, batch_size=3)
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
    outputs = predict_gene_outputs(model, cells, PredictConfig(("mu", "gene_llh")), torch.device("cpu"), gene_columns)
    last_gene = cells.batch(full).gene_tokens[:, end_target_position(cells.seq_len)].numpy() - n_special
    assert (outputs.gene_values["gene_llh"][full, last_gene] == 0).all()
    assert (outputs.gene_values["mu"][full, last_gene] != 0).all()
    per_cell = np.diff(outputs.gene_values["gene_llh"].indptr)
    assert (per_cell[full] == cells.seq_len - 1).all()


def test_chunk_file_round_trip(chunk, tmp_path):
    save_part(Part(chunk), tmp_path / "unit.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["unit.npz"]
    loaded = load_part(tmp_path / "unit.npz")
    assert_equal_chunks(loaded.outputs, chunk)
    assert loaded.obs is None


def test_a_part_with_rows_of_its_own_keeps_them_without_pickling(chunk, tmp_path):
    rows = pd.DataFrame(
        {"perturbation": [f"KO G{i % 3}" for i in range(10)], "dose": np.arange(10.0), "kept": np.arange(10) % 2 == 0},
        index=[f"cell{i}/p" for i in range(10)],
    )
    labels = np.array([f"type {i}" for i in range(10)], dtype=object)  # a per-row string beyond the model's outputs
    outputs = GeneOutputs(chunk.n_cells, chunk.cell_values | {"label": labels}, chunk.gene_values, chunk.cge)
    save_part(Part(outputs, rows), tmp_path / "unit.npz")
    with np.load(tmp_path / "unit.npz", allow_pickle=False) as npz:  # every member reads without unpickling
        assert all(npz[name].dtype.kind != "O" for name in npz.files)
    loaded = load_part(tmp_path / "unit.npz")
    pd.testing.assert_frame_equal(loaded.obs, rows)
    assert_equal_chunks(loaded.outputs, outputs)
    rows["owner"] = [object()] * 10
    with pytest.raises(TypeError, match="obs column owner: a saved unit holds numbers, booleans or strings"):
        save_part(Part(outputs, rows), tmp_path / "other.npz")


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
    obs = concat_frames([first, second])
    assert list(obs.index) == ["c1", "c2", "c3", "c1"]
    assert obs["good"].dtype == "boolean" and obs["good"].isna().tolist() == [False, False, True, True]
    assert obs["n"].tolist() == ["1", "2", "x", "y"]
    assert obs["label"].tolist() == ["a", "b", "b", "z"]
    outputs = GeneOutputs(n_cells=4, cell_values={"embeddings": np.zeros((4, 2), np.float32)})
    write_output(tmp_path / "out.h5ad", obs, pd.DataFrame(index=pd.Index([])), [outputs], {"package_version": "test"})
    with pytest.warns(UserWarning, match="Observation names are not unique"):  # kept as the inputs had them
        back = ad.read_h5ad(tmp_path / "out.h5ad")
    assert back.obs["good"].tolist()[:2] == [True, False] and back.obs["good"].isna().sum() == 2


def test_file_written_chunk_by_chunk_holds_every_output(chunk, tmp_path, reference_model):
    obs = pd.DataFrame({"label": list("abcdefghij")}, index=[f"cell{i}" for i in range(10)])
    genes = pd.Index(reference_model.checkpoint.gene_vocab.gene_ids, name="gene_id")  # the chunk's gene axis
    var = pd.DataFrame({"symbol": [f"gene{i}" for i in range(len(genes))]}, index=genes)
    halves = [chunk.take(np.arange(3)), chunk.take(np.arange(3, 10))]
    write_output(tmp_path / "out.h5ad", obs, var, iter(halves), {"package_version": "test"})
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    assert list(back.obs_names) == list(obs.index) and list(back.obs["label"]) == list(obs["label"])
    pd.testing.assert_frame_equal(back.var, var)
    np.testing.assert_array_equal(back.obsm["X_transcriptformer"], chunk.cell_values["embeddings"])
    np.testing.assert_array_equal(back.obsm["embeddings"], chunk.cell_values["embeddings"])  # the original's key
    with h5py.File(tmp_path / "out.h5ad") as f:  # the same dataset under both keys: stored once
        assert f["obsm/embeddings"] == f["obsm/X_transcriptformer"]
    np.testing.assert_array_equal(back.obs["llh"], chunk.cell_values["llh"])
    np.testing.assert_array_equal(back.uns["llh"]["llh"], chunk.cell_values["llh"])
    for key in ("mu", "gene_llh"):
        assert (back.layers[key] != chunk.gene_values[key]).nnz == 0
    assert (back.X != chunk.gene_values["mu"]).nnz == 0  # X: the expected counts
    np.testing.assert_array_equal(back.uns["cge_embeddings"], chunk.cge["embeddings"])
    np.testing.assert_array_equal(back.uns["cge_cell_indices"], chunk.cge["cell_index"])
    np.testing.assert_array_equal(back.uns["cge_gene_names"], genes[chunk.cge["gene_index"]])
    assert back.uns["transcriptformer"]["package_version"] == "test"


def test_output_rows_must_match_obs(chunk, tmp_path, reference_model):
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(12)])
    var = pd.DataFrame(index=pd.Index(reference_model.checkpoint.gene_vocab.gene_ids))  # the chunk's gene axis
    with pytest.raises(ValueError, match="10 cells of outputs for 12 rows of obs"):
        write_output(tmp_path / "out.h5ad", obs, var, [chunk], {})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_an_existing_file(chunk, tmp_path):
    target = tmp_path / "out.h5ad"
    target.write_bytes(b"an earlier result")
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(10)])
    no_genes = pd.DataFrame(index=pd.Index([]))
    with pytest.raises(FileExistsError, match="pass `overwrite=True`"):
        write_output(target, obs, no_genes, [GeneOutputs(10, dict(chunk.cell_values))], {}, overwrite=False)
    assert target.read_bytes() == b"an earlier result"
    write_output(target, obs, no_genes, [GeneOutputs(10, dict(chunk.cell_values))], {}, overwrite=True)
    assert ad.read_h5ad(target).n_obs == 10
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5ad"]


@pytest.fixture(scope="module")
def run_inference(reference_dir, reference_input, tmp_path_factory):
    """The output file of ``transcriptformer inference`` on the reference cells, for some output keys."""

    def run(*keys: str) -> ad.AnnData:
        output = tmp_path_factory.mktemp("inference")
        args = ["inference", "--checkpoint-path", str(reference_dir), "--data-file", str(reference_input)]
        assert main([*args, "--output-path", str(output), "--output-keys", *keys]) == 0
        return ad.read_h5ad(output / "embeddings.h5ad")

    return run


@pytest.fixture(scope="module")
def cge_output(run_inference):
    return run_inference("embeddings", "cge")


@pytest.mark.slow  # scanpy's first neighbors call compiles pynndescent (about 20 s)
def test_cell_outputs_have_no_genes_and_the_readmes_scanpy_calls_work(run_inference):
    adata = run_inference("embeddings", "llh")
    assert adata.shape == (64, 0) and adata.X.shape == (64, 0)  # no gene matrix, but a valid (empty) one
    assert list(adata.layers) == []
    sc.pp.neighbors(adata, use_rep="embeddings")  # the README's calls
    sc.tl.umap(adata)
    sc.pl.umap(adata, color="cell_type", show=False)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2)
    assert adata.obsm["X_umap"].shape == (64, 2) and adata.obs["leiden"].notna().all()
    adata.obsm["X_pca"] = sc.pp.pca(adata.obsm["X_transcriptformer"], n_comps=10)  # PCA of the embeddings (docs)
    assert adata.obsm["X_pca"].shape == (64, 10) and np.isfinite(adata.obsm["X_pca"]).all()


def test_per_gene_outputs_are_layers_over_the_inputs_var(run_inference, reference_input):
    adata = run_inference("embeddings", "gene_llh", "mu")
    source = ad.read_h5ad(reference_input)
    assert adata.var_names.name == "gene_id" and adata.var_names.is_unique
    assert list(adata.var.columns) == [*source.var.columns, "input_var_name", "symbol"]
    kept = source.var.loc[adata.var["input_var_name"]]
    assert list(kept["ensembl_id"]) == list(adata.var_names)
    for column in source.var.columns:
        assert list(adata.var[column]) == list(kept[column]), column
    assert (adata.var["symbol"] == kept["gene_name"].to_numpy()).mean() > 0.95  # the bundled table's symbols
    for key in ("mu", "gene_llh"):
        assert adata.layers[key].shape == adata.shape == (64, adata.n_vars)
    assert (adata.X != adata.layers["mu"]).nnz == 0  # X: the expected counts, a matrix scanpy can work on
    sc.pp.pca(adata, n_comps=10)
    assert adata.obsm["X_pca"].shape == (64, 10) and np.isfinite(adata.obsm["X_pca"]).all()


def test_an_input_gene_id_column_is_kept(reference_dir, reference_input, tmp_path):
    source = ad.read_h5ad(reference_input)
    source.var["gene_id"] = source.var["ensembl_id"] + ".7"  # versioned ids: not the output's gene ids
    source.write_h5ad(tmp_path / "versioned.h5ad")
    args = ["inference", "--checkpoint-path", str(reference_dir), "--data-file", str(tmp_path / "versioned.h5ad")]
    assert main([*args, "--output-path", str(tmp_path), "--output-keys", "mu"]) == 0
    adata = ad.read_h5ad(tmp_path / "embeddings.h5ad")
    assert list(adata.var["gene_id"]) == [f"{gene}.7" for gene in adata.var_names]


def test_the_main_matrix_order_names_every_per_gene_layer():
    assert set(MAIN_MATRIX_ORDER) == {key for key, spec in OUTPUTS.items() if spec.anndata == "layers"}


def test_contextual_embeddings_are_readable_as_the_original_release_wrote_them(
    cge_output, api_outputs, reference_model
):
    adata = cge_output
    assert adata.n_vars == 0  # the genes are named in uns, no per-gene layer was asked for
    assert adata.uns["cge_embeddings"].dtype == np.float32 and adata.uns["cge_cell_indices"].dtype == np.int64
    # the original release's documented reading code, as written there
    cge_embeddings = adata.uns["cge_embeddings"]  # Shape: (n_gene_instances, embedding_dim)
    cell_indices = adata.uns["cge_cell_indices"]  # Which cell each embedding belongs to
    gene_names = adata.uns["cge_gene_names"]  # Gene name for each embedding
    cell_0_mask = cell_indices == 0
    cell_0_embeddings = cge_embeddings[cell_0_mask]
    cell_0_genes = gene_names[cell_0_mask]
    # they are cell 0's genes in sequence order, with its contextual embeddings
    tokens = api_outputs["gene_token_indices"][0]
    in_sequence = tokens != reference_model.model.special_tokens.pad
    vocab_ids = np.array(list(reference_model.checkpoint.gene_vocab.index))
    assert list(cell_0_genes) == list(vocab_ids[tokens[in_sequence]])
    np.testing.assert_array_equal(cell_0_embeddings, api_outputs["cge"][0][in_sequence])
    gene_mask = (cell_indices == 0) & (gene_names == cell_0_genes[3])
    np.testing.assert_array_equal(cge_embeddings[gene_mask][0], api_outputs["cge"][0, 3])
    # every cell: positions of obs, in order
    assert np.all(np.diff(cell_indices) >= 0) and set(cell_indices) == set(range(adata.n_obs))


def test_contextual_embeddings_of_one_gene(cge_output, reference_model, api_outputs):
    adata = cge_output
    gene = adata.uns["cge_gene_names"][10]
    cells, embeddings = contextual_embeddings(adata, gene)
    tokens = api_outputs["gene_token_indices"]
    rows, positions = np.nonzero(tokens == reference_model.checkpoint.gene_vocab[gene])
    assert list(cells) == list(adata.obs_names[rows]) and len(cells) > 1
    np.testing.assert_array_equal(embeddings, api_outputs["cge"][rows, positions])
    with pytest.raises(KeyError, match="no cell's sequence in this output holds gene 'ENSMUSG0'"):
        contextual_embeddings(adata, "ENSMUSG0")
    with pytest.raises(KeyError, match="`emb_type=cge`"):
        contextual_embeddings(ad.AnnData(obs=adata.obs), gene)
