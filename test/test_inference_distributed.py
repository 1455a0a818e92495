"""Several inference processes (gloo, on CPU) write one merged file, equal to the single-process one, in input order."""

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from conftest import DATA_DIR
from transcriptformer.cli import main
from transcriptformer.engine.distributed import Rank, resolve_world_size, torchrun_rank

MOUSE_10X = DATA_DIR / "mouse_10x_40cells.h5ad"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def arguments(reference_dir, reference_input):
    """Two files, small units so that each process runs several, every output."""
    files = [str(reference_input), str(MOUSE_10X)]
    return ["--checkpoint-path", str(reference_dir), "--data-file", *files, "--device", "cpu", "--emb-type", "cge"] + [
        "--output-keys",
        "embeddings",
        "llh",
        "gene_llh",
        "mu",
        "--config-override",
        "model.inference_config.chunk_size=24",
    ]


@pytest.fixture(scope="module")
def single_process(arguments, tmp_path_factory):
    output = tmp_path_factory.mktemp("single")
    assert main(["inference", *arguments, "--output-path", str(output)]) == 0
    return ad.read_h5ad(output / "embeddings.h5ad")


def assert_same_outputs(merged: ad.AnnData, single: ad.AnnData) -> None:
    assert list(merged.obs_names) == list(single.obs_names)
    assert merged.obs.equals(single.obs)
    assert list(merged.var_names) == list(single.var_names)
    np.testing.assert_array_equal(merged.obsm["X_transcriptformer"], single.obsm["X_transcriptformer"])
    for layer in ("mu", "gene_llh"):
        assert (merged.layers[layer] != single.layers[layer]).nnz == 0, layer
    for key in ("cge_embeddings", "cge_cell_indices", "cge_gene_names"):
        np.testing.assert_array_equal(merged.uns[key], single.uns[key])


def run_command(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # CUDA_VISIBLE_DEVICES="" keeps a machine with GPUs on the CPU path this test is about
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # three fresh processes (30 s on two busy cores)
def test_two_processes_write_the_single_process_file(arguments, single_process, tmp_path):
    done = run_command([str(BIN / "transcriptformer"), "inference", *arguments, "--num-gpus", "2"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "104 cells in" in done.stdout and "(2 processes)" in done.stdout
    merged = ad.read_h5ad(tmp_path / "inference_results" / "embeddings.h5ad")
    assert merged.uns["transcriptformer"]["processes"] == 2
    assert_same_outputs(merged, single_process)
    # no unit files left; the (empty) lock file of the output stays
    assert sorted(os.listdir(tmp_path / "inference_results")) == [".embeddings.h5ad.lock", "embeddings.h5ad"]


def test_torchrun_launch_writes_the_single_process_file(arguments, single_process, tmp_path):
    command = [str(BIN / "torchrun"), "--nproc-per-node", "2", str(BIN / "transcriptformer"), "inference", *arguments]
    done = run_command(command, tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same_outputs(ad.read_h5ad(tmp_path / "inference_results" / "embeddings.h5ad"), single_process)


@pytest.mark.slow  # three fresh processes (27 s on two busy cores)
def test_a_failing_process_is_reported_and_writes_nothing(reference_dir, tmp_path):
    command = [str(BIN / "transcriptformer"), "inference", "--checkpoint-path", str(reference_dir), "--data-file"]
    command += [str(DATA_DIR / "pbmc_40cells.h5ad"), "--device", "cpu", "--num-gpus", "2"]
    done = run_command(command, tmp_path)
    assert done.returncode == 1
    assert "an inference process failed" in done.stderr
    assert "none of the 2000 genes of the data is in the model's vocabulary" in done.stderr
    assert not (tmp_path / "inference_results" / "embeddings.h5ad").exists()


def test_number_of_processes():
    cpu = torch.device("cpu")
    assert resolve_world_size(cpu, 1) == 1 and resolve_world_size(cpu, 3) == 3 and resolve_world_size(cpu, -1) == 1
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asks for 2 GPUs but 0 are visible"):
            resolve_world_size(torch.device("cuda"), 2)


def test_rank_from_the_launchers_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert torchrun_rank() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_rank() == Rank(rank=3, world_size=4, local_rank=1)
