"""Cells from a TileDB-SOMA experiment, embeddings into a SOMA array: offline, on experiments written here.

The experiments are written with ``tiledbsoma.io.from_h5ad`` from the bundled real cells, their var given the
CELLxGENE schema's ``feature_id``; a run over one must give the numbers of a run over the ``.h5ad`` itself, cell by
cell (matched by ``soma_joinid``), in one process or several, killed and resumed or not.
"""

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tiledbsoma
import tiledbsoma.io
import torch

from conftest import REFERENCE_DIR, REFERENCE_INPUT, assert_no_output
from test_inference_resume import kill_after_some_units
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.cli import main
from transcriptformer.config import SOMA_BLOCK_CELLS
from transcriptformer.data.soma import SomaReader
from transcriptformer.data.sources import open_counts
from transcriptformer.engine import RunConfig, parts
from transcriptformer.engine.session import prepare, sha256_of
from transcriptformer.engine.soma_output import COMPLETE, EMBEDDING_INFO
from transcriptformer.errors import UserError
from transcriptformer.tasks.embed import EmbedTask

BIN = Path(sys.executable).parent
LUNG_LIKE = "cell_type == 'astrocyte' and cluster_confidence_score > 0.5"  # a filter on two obs columns


def write_experiment(h5ad: Path, folder: Path) -> str:
    """A SOMA experiment of ``h5ad``'s cells (measurement RNA, X layer raw), with var ``feature_id``."""
    cells = ad.read_h5ad(h5ad)
    cells.var["feature_id"] = cells.var["ensembl_id"]
    folder.mkdir(parents=True)
    with_ids = folder / "cells.h5ad"
    cells.write_h5ad(with_ids)
    return tiledbsoma.io.from_h5ad(str(folder / "experiment"), with_ids, "RNA", X_layer_name="raw")


def read_array(uri: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Plain tiledbsoma: the joinids that have an embedding, their embeddings, and the array's metadata."""
    with tiledbsoma.open(uri) as array:
        table = array.read().tables().concat()
        rows, columns = table["soma_dim_0"].to_numpy(), table["soma_dim_1"].to_numpy()
        dense = np.full(array.shape, np.nan, dtype=np.float32)
        dense[rows, columns] = table["soma_data"].to_numpy()
        joinids = np.unique(rows)
        return joinids, dense[joinids], dict(array.metadata)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> str:
    return write_experiment(REFERENCE_INPUT, tmp_path_factory.mktemp("soma") / "reference")


@pytest.fixture(scope="module")
def from_h5ad(tmp_path_factory) -> ad.AnnData:
    """The reference cells' outputs, computed from the .h5ad file."""
    output = tmp_path_factory.mktemp("h5ad")
    arguments = ["--data-file", REFERENCE_INPUT, "--output-keys", "embeddings", "llh", "--output-path", output]
    assert main(["inference", "--checkpoint-path", str(REFERENCE_DIR), *map(str, arguments)]) == 0
    return ad.read_h5ad(output / "embeddings.h5ad")


def inference(experiment: str, output: Path, *extra) -> list[str]:
    command = ["inference", "--checkpoint-path", REFERENCE_DIR, "--soma", experiment, "--output-path", output]
    return [str(arg) for arg in (*command, *extra)]


def test_a_soma_experiment_gives_the_h5ad_numbers_and_a_census_style_array(experiment, from_h5ad, tmp_path, capsys):
    array = tmp_path / "embeddings.soma"
    extra = ["--output-keys", "embeddings", "llh", "--output-format", "both", "--output-soma", array]
    assert main(inference(experiment, tmp_path, *extra)) == 0
    printed = capsys.readouterr().out
    assert f"Output: {array}" in printed and "from the SOMA experiment" in printed

    adata = ad.read_h5ad(tmp_path / "embeddings.h5ad")
    assert list(adata.obs_names) == list(from_h5ad.obs_names)  # from_h5ad kept the names in obs_id
    np.testing.assert_array_equal(adata.obs["soma_joinid"], np.arange(64))
    np.testing.assert_array_equal(adata.obsm["X_transcriptformer"], from_h5ad.obsm["X_transcriptformer"])
    np.testing.assert_array_equal(adata.obs["llh"], from_h5ad.obs["llh"])
    recorded = adata.uns["transcriptformer"]["soma"]
    assert recorded["experiment_uri"] == experiment and recorded["x_layer"] == "raw"

    joinids, embeddings, metadata = read_array(str(array))
    np.testing.assert_array_equal(joinids, np.arange(64))
    np.testing.assert_array_equal(embeddings, from_h5ad.obsm["X_transcriptformer"])
    assert metadata[COMPLETE] is True
    info = json.loads(metadata[EMBEDDING_INFO])
    assert info["weights_sha256"] == sha256_of(REFERENCE_DIR / "model_weights.pt")
    assert (info["n_embeddings"], info["n_features"]) == embeddings.shape
    assert info["measurement_name"] == "RNA" and info["query"]["experiment_uri"] == experiment
    cellxgene_census = pytest.importorskip("cellxgene_census.experimental")
    assert cellxgene_census.get_embedding_metadata(str(array)) == info  # what the Census' own reader reads
    assert not list(tmp_path.glob(".embeddings.soma.*-soma"))  # the temporary array was renamed into place


def test_an_experiment_made_with_from_anndata_defaults_runs_without_flags(from_h5ad, tmp_path, capsys):
    # tiledbsoma.io.from_anndata as a user calls it: X layer "data", var as the file's (no feature_id).
    uri = tiledbsoma.io.from_anndata(str(tmp_path / "experiment"), ad.read_h5ad(REFERENCE_INPUT), "RNA")
    output = tmp_path / "out"
    assert main(inference(uri, output, "--output-keys", "embeddings", "llh")) == 0
    assert "reading the experiment's one X layer 'data' (it has no layer 'raw')" in capsys.readouterr().out
    adata = ad.read_h5ad(output / "embeddings.h5ad")
    np.testing.assert_array_equal(adata.obsm["embeddings"], from_h5ad.obsm["embeddings"])
    np.testing.assert_array_equal(adata.obs["llh"], from_h5ad.obs["llh"])
    assert adata.uns["transcriptformer"]["soma"]["x_layer"] == "data"  # the layer read, not the default asked


def test_without_a_gene_id_column_the_hint_names_the_columns_of_ids(tmp_path, capsys):
    cells = ad.read_h5ad(REFERENCE_INPUT)
    cells.var = cells.var[["ensembl_id"]].rename(columns={"ensembl_id": "gene_ids"})
    cells.var_names = [str(i) for i in range(cells.n_vars)]  # var_id holds 0, 1, ...: no gene ids
    uri = tiledbsoma.io.from_anndata(str(tmp_path / "experiment"), cells, "RNA")
    code, err = run_cli(capsys, *inference(uri, tmp_path / "out"))
    assert_one_line_error(
        code, err, "inference", "gene id column 'ensembl_id' not in var", "pass --gene-col-name gene_ids"
    )
    assert_no_output(tmp_path / "out")


def test_an_obs_filter_runs_the_cells_it_selects(experiment, from_h5ad, tmp_path):
    array = tmp_path / "astrocytes"
    assert main(inference(experiment, tmp_path, "--obs-filter", LUNG_LIKE, "--output-soma", array)) == 0
    assert not (tmp_path / "embeddings.h5ad").exists()  # --output-soma alone writes the array only
    obs = from_h5ad.obs
    selected = np.flatnonzero((obs["cell_type"] == "astrocyte") & (obs["cluster_confidence_score"] > 0.5))
    assert 0 < selected.size < 64
    joinids, embeddings, metadata = read_array(str(array))
    np.testing.assert_array_equal(joinids, selected)
    np.testing.assert_array_equal(embeddings, from_h5ad.obsm["X_transcriptformer"][selected])
    assert json.loads(metadata[EMBEDDING_INFO])["query"]["obs_filter"] == LUNG_LIKE
    with tiledbsoma.open(str(array)) as opened:
        assert opened.shape[0] == selected.max() + 1


def test_a_census_folder_needs_the_organism(tmp_path, capsys):
    census = tmp_path / "census"
    with tiledbsoma.Collection.create(str(census)) as root:
        data = root.add_new_collection("census_data")
        uri = tiledbsoma.io.from_h5ad(
            str(census / "census_data" / "mus_musculus"), REFERENCE_INPUT, "RNA", X_layer_name="raw"
        )
        with tiledbsoma.open(uri) as mouse:
            data.set("mus_musculus", mouse, use_relative_uri=True)
    gene_ids = ["--gene-col-name", "ensembl_id"]  # this experiment's var has no feature_id
    code, err = run_cli(capsys, *inference(str(census), tmp_path, *gene_ids))
    assert_one_line_error(code, err, "inference", "holds several experiments (mus_musculus)", "--organism")
    code, err = run_cli(capsys, *inference(str(census), tmp_path, *gene_ids, "--organism", "homo_sapiens"))
    assert_one_line_error(code, err, "inference", "no experiment 'homo_sapiens'", "it holds mus_musculus")
    assert main(inference(str(census), tmp_path, *gene_ids, "--organism", "Mus musculus", "--dry-run")) == 0
    assert "Plan: 64 cells" in capsys.readouterr().out


@pytest.mark.parametrize("block_cells", [5, SOMA_BLOCK_CELLS])  # blocks smaller than the query, or one block
def test_reader_streams_the_queried_rows_in_blocks(experiment, block_cells):
    cells = ad.read_h5ad(REFERENCE_INPUT)
    expected = np.flatnonzero(cells.obs["cluster_confidence_score"] > 0.5)
    query = {"obs_filter": "cluster_confidence_score > 0.5", "obs_columns": ["assay"], "block_cells": block_cells}
    with SomaReader(experiment, **query) as reader:
        assert (reader.n_obs, reader.max_joinid) == (expected.size, expected[-1])
        assert reader.query_sha256 == hashlib.sha256(expected.astype(np.int64).tobytes()).hexdigest()
        np.testing.assert_array_equal(reader.joinids(), expected)
        np.testing.assert_array_equal(reader.joinids(3, 12), expected[3:12])  # three blocks of 5
        obs = reader.read_obs()
        assert list(obs.columns) == reader.obs_columns == ["soma_joinid", "assay"]
        assert list(obs.index) == list(cells.obs_names[expected])
        np.testing.assert_array_equal(obs["soma_joinid"], expected)
        assert list(reader.read_obs(4, 11).index) == list(cells.obs_names[expected[4:11]])
        block = reader.rows(3, 20)
        assert (block != cells.X[expected[3:20]]).nnz == 0 and block.dtype == np.float32
        assert reader.rows(5, 5).shape == (0, cells.n_vars)


@pytest.mark.parametrize("cell_filters", [{}, {"min_expressed_genes": 40, "drop_empty_cells": True}])
def test_a_query_read_in_blocks_gives_the_cells_of_the_file(experiment, cell_filters):
    """Tokenized in units that straddle the query's blocks, the cells are the file's: counts, aux tokens, names.

    The pass over the query's counts keeps no statistics per cell (those of a file serve the screen's plan).
    """
    tokenizer = load_checkpoint(REFERENCE_DIR, "cpu").tokenizer(gene_col_name="ensembl_id", **cell_filters)
    with open_counts(REFERENCE_INPUT) as file, SomaReader(experiment, block_cells=7) as reader:
        from_file, streamed = tokenizer.prepare(file), tokenizer.prepare(reader)
        assert len(streamed) == len(from_file) and streamed.dropped == from_file.dropped
        assert streamed.expressed is None and from_file.expressed is not None
        for start in range(0, len(from_file), 10):
            stop = min(start + 10, len(from_file))
            a, b = from_file.cells(start, stop), streamed.cells(start, stop)
            assert list(b.obs_names) == list(a.obs_names)
            assert (a.counts != b.counts).nnz == 0
            np.testing.assert_array_equal(b.aux_tokens, a.aux_tokens)
    if cell_filters:
        assert 0 < from_file.n_dropped < 64  # the filters dropped cells between others


def test_blocks_smaller_than_the_units_give_the_same_outputs(experiment, from_h5ad, tmp_path):
    def run(folder: Path, block_cells: int) -> ad.AnnData:
        blocks = ["--config-override", f"input.soma_block_cells={block_cells}", "--chunk-size", "16"]
        extra = ["--output-keys", "embeddings", "llh", "--output-format", "both", "--output-soma", folder / "e.soma"]
        assert main(inference(experiment, folder, *extra, *blocks)) == 0
        return ad.read_h5ad(folder / "embeddings.h5ad")

    adata, one_block = run(tmp_path / "blocks", 7), run(tmp_path / "one", SOMA_BLOCK_CELLS)
    pd.testing.assert_frame_equal(adata.obs, one_block.obs)  # every obs column, read a block at a time
    assert list(adata.obs_names) == list(from_h5ad.obs_names)
    assert list(adata.obs["cell_type"]) == list(from_h5ad.obs["cell_type"])
    np.testing.assert_array_equal(adata.obs["soma_joinid"], np.arange(64))
    np.testing.assert_array_equal(adata.obsm["X_transcriptformer"], from_h5ad.obsm["X_transcriptformer"])
    # Units of 16 cells batch differently from the whole file: a sum over a cell's genes moves by float32 rounding.
    np.testing.assert_allclose(adata.obs["llh"], from_h5ad.obs["llh"], rtol=1e-6)
    joinids, embeddings, _ = read_array(str(tmp_path / "blocks" / "e.soma"))
    np.testing.assert_array_equal(joinids, np.arange(64))
    np.testing.assert_array_equal(embeddings, from_h5ad.obsm["X_transcriptformer"])


def test_invalid_counts_of_a_query_name_the_cell_read_from_its_block(tmp_path, capsys):
    cells = ad.read_h5ad(REFERENCE_INPUT)
    cells.X = cells.X.tocsr().astype(np.float32)
    cells.X.data[cells.X.indptr[40] : cells.X.indptr[41]] = np.nan  # every stored count of cell 40
    corrupted = tmp_path / "nan.h5ad"
    cells.write_h5ad(corrupted)
    experiment = write_experiment(corrupted, tmp_path / "soma")
    blocks = ["--config-override", "input.soma_block_cells=16"]
    code, err = run_cli(capsys, *inference(experiment, tmp_path / "out", *blocks))
    words = ["NaN, infinite or negative", "in 1 cell(s)", f"value nan of cell {cells.obs_names[40]!r} (row 40)"]
    assert_one_line_error(code, err, "inference", *words, "--invalid-counts drop")
    assert_no_output(tmp_path / "out")


def soma_session(experiment: str, output: Path, obs_filter: str | None, block_cells: int):
    config = RunConfig.from_checkpoint(
        REFERENCE_DIR, soma=str(experiment), obs_filter=obs_filter, soma_block_cells=block_cells, chunk_size=8,
        output_path=str(output), output_soma=str(output / "array.soma"), resume=True, device="cpu",
    )  # fmt: skip
    config.model.data_config = replace(config.model.data_config, gene_col_name="feature_id", min_expressed_genes=40)
    return prepare(config, torch.device("cpu"), EmbedTask())


def test_resume_takes_the_same_units_whatever_the_blocks_and_refuses_another_query(experiment, tmp_path):
    with soma_session(experiment, tmp_path, "cluster_confidence_score > 0.2", 5) as session:
        assert parts.open_parts_dir(session) == 0
        units = [session.unit_joinids(unit) for unit in session.units]
    manifest = json.loads((parts.parts_dir(session) / parts.MANIFEST).read_text())
    assert manifest["unit_soma_joinids"] == [[int(u[0]), int(u[-1])] for u in units]
    with soma_session(experiment, tmp_path, "cluster_confidence_score > 0.2", 64) as again:
        assert parts.open_parts_dir(again) == 0  # the same run: resumed
        for unit, joinids in zip(again.units, units, strict=True):
            np.testing.assert_array_equal(again.unit_joinids(unit), joinids)
    with soma_session(experiment, tmp_path, "cluster_confidence_score > 0.3", 5) as other:
        with pytest.raises(UserError, match="the cells of its query"):
            parts.open_parts_dir(other)


def run_command(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "transcriptformer"), *arguments]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def many(tmp_path_factory, many_cells) -> str:
    """1,280 real cells (the reference cells 20 times over) as a SOMA experiment."""
    return write_experiment(many_cells, tmp_path_factory.mktemp("soma") / "many")


def embeddings_by_joinid(array: Path) -> tuple[np.ndarray, np.ndarray]:
    joinids, embeddings, metadata = read_array(str(array))
    assert metadata[COMPLETE] is True
    return joinids, embeddings


@pytest.mark.slow
def test_processes_killed_and_resumed_give_the_single_process_array(many, tmp_path):
    # The outlier filter reads every cell's total count: the processes' shared pass over the counts must give
    # each of them the single pass' totals, or they would keep other cells.
    units = ["--chunk-size", "16", "--batch-size", "4", "--device", "cpu"]
    units += ["--config-override", "model.data_config.filter_outliers=1.5"]
    single = run_command(
        inference(many, tmp_path / "single", *units, "--output-soma", tmp_path / "single.soma"), tmp_path
    )
    assert single.returncode == 0, single.stderr

    output, array = tmp_path / "two", tmp_path / "two.soma"
    two = inference(many, output, *units, "--output-soma", array, "--num-gpus", "2")
    kill_after_some_units([str(BIN / "transcriptformer"), *two], output / ".embeddings.h5ad.parts", units=6)
    assert not array.exists()
    manifest = json.loads((output / ".embeddings.h5ad.parts" / "run.json").read_text())
    ranges = manifest["unit_soma_joinids"]  # each unit's first and last joinid, units in joinid order
    assert all(first <= last < after for (first, last), (after, _) in zip(ranges, ranges[1:], strict=False))
    resumed = run_command([*two, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming:" in resumed.stdout and "(2 processes)" in resumed.stdout

    joinids, embeddings = embeddings_by_joinid(array)
    assert 0 < joinids.size < 1280 and len(ranges) == -(-joinids.size // 16)  # the filter dropped some cells
    assert [joinids[0], joinids[-1]] == [ranges[0][0], ranges[-1][1]]
    single_joinids, single_embeddings = embeddings_by_joinid(tmp_path / "single.soma")
    np.testing.assert_array_equal(joinids, single_joinids)
    np.testing.assert_array_equal(embeddings, single_embeddings)


@pytest.mark.slow  # three fresh processes (20 s on two busy cores)
def test_two_processes_write_the_single_process_file(experiment, from_h5ad, tmp_path):
    done = run_command(
        inference(experiment, tmp_path, "--num-gpus", "2", "--chunk-size", "16", "--device", "cpu"), tmp_path
    )
    assert done.returncode == 0, done.stderr
    merged = ad.read_h5ad(tmp_path / "embeddings.h5ad")
    assert merged.uns["transcriptformer"]["processes"] == 2
    assert list(merged.obs_names) == list(from_h5ad.obs_names)
    np.testing.assert_array_equal(merged.obsm["X_transcriptformer"], from_h5ad.obsm["X_transcriptformer"])


def test_an_existing_array_is_kept_unless_overwrite(experiment, tmp_path, capsys):
    array = tmp_path / "embeddings.soma"
    assert main(inference(experiment, tmp_path, "--output-soma", array)) == 0
    code, err = run_cli(capsys, *inference(experiment, tmp_path, "--output-soma", array))
    assert_one_line_error(code, err, "inference", f"{array} exists", "--overwrite")
    assert main(inference(experiment, tmp_path, "--output-soma", array, "--overwrite")) == 0
    assert read_array(str(array))[2][COMPLETE] is True
    not_an_array = tmp_path / "notes"
    not_an_array.mkdir()
    code, err = run_cli(capsys, *inference(experiment, tmp_path, "--output-soma", not_an_array, "--overwrite"))
    assert_one_line_error(code, err, "inference", "is not a SOMA array of embeddings", "choose another --output-soma")
    assert not_an_array.is_dir()


def test_the_public_census_offline_is_one_clear_line(tmp_path, monkeypatch, capsys):
    # A proxy that refuses connections: offline whatever the machine (requests reads HTTPS_PROXY).
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    command = ["inference", "--checkpoint-path", REFERENCE_DIR, "--census-version", "2025-01-30"]
    code, err = run_cli(capsys, *command, "--organism", "homo_sapiens")
    assert_one_line_error(code, err, "inference", "could not reach the CELLxGENE Census", "--soma")
    assert_no_output(tmp_path / "inference_results")


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--obs-filter", "cell_type == "], ["--obs-filter", "is not a valid SOMA value filter", "tissue_general"]),
        (["--obs-filter", "no_such_column == 1"], ["no_such_column does not exist", "cell_type"]),
        (["--obs-filter", "cell_type == 'nothing'"], ["selects no cells", "relax it"]),
        (["--soma-x-layer", "normalized"], ["--soma-x-layer normalized", "it has raw"]),
        (["--soma-measurement", "ATAC"], ["--soma-measurement ATAC", "it has RNA"]),
        (["--output-format", "soma"], ["writes a SOMA array", "--output-soma"]),
        (["--output-soma", "x.soma", "--output-keys", "llh"], ["holds cell embeddings", "--output-format both"]),
    ],
)
def test_mistakes_with_a_soma_input_are_one_line(experiment, tmp_path, capsys, extra, words):
    code, err = run_cli(capsys, *inference(experiment, tmp_path, *extra))
    assert_one_line_error(code, err, "inference", *words)
    assert_no_output(tmp_path)


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["--soma", "missing_folder"], ["--soma missing_folder", "no SOMA experiment or Census there"]),
        (["--soma", REFERENCE_INPUT], ["no SOMA experiment or Census there"]),
        (
            ["--data-file", REFERENCE_INPUT, "--organism", "homo_sapiens"],
            ["organism selects the experiment of a Census", "--census-version"],
        ),
        (  # the filter selects cells of files too: a column the file lacks is named with the file's columns
            ["--data-file", REFERENCE_INPUT, "--obs-filter", "x == 1"],
            ["--obs-filter 'x == 1' is not a valid filter on obs", "reference_tiny"],
        ),
        (
            ["--data-file", REFERENCE_INPUT, "--output-soma", "x.soma"],
            ["soma_joinid of the input experiment", "--soma"],
        ),
        (["--census-version", "stable"], ["--census-version", "--organism"]),
    ],
)
def test_mistakes_choosing_the_cells_are_one_line(tmp_path, capsys, arguments, words):
    code, err = run_cli(capsys, "inference", "--checkpoint-path", REFERENCE_DIR, "--output-path", tmp_path, *arguments)
    assert_one_line_error(code, err, "inference", *words)
    assert_no_output(tmp_path)


def test_without_tiledbsoma_the_message_says_what_to_install(experiment, tmp_path):
    code = (
        "import sys\n"
        "sys.modules['tiledbsoma'] = None  # as if it were not installed\n"
        "from transcriptformer.cli import main\n"
        f"sys.exit(main(['inference', '--checkpoint-path', {str(REFERENCE_DIR)!r}, '--soma', {experiment!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert_one_line_error(done.returncode, done.stderr, "inference", 'pip install "transcriptformer[soma]"')
