"""``transcriptformer perturb`` runs through the engine, and has what the engine gives every run.

Killed and resumed, or split over two processes, it writes the folder of an uninterrupted single-process run; its
tables appear with the ``.h5ad`` and replace nothing without ``--overwrite``.
"""

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import DATA_DIR
from test_inference_resume import kill_after_some_units
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.cli import main

DEMO = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"
HELDOUT = DATA_DIR / "demo_mouse_brain_heldout.h5ad"
BIN = Path(sys.executable).parent
# An expressed gene knocked out, another over-expressed, small units: every unit holds affected and unaffected rows.
PERTURBATIONS = ["--knock-out", "Pou3f3", "--over-express", "Gad2=20", "--chunk-size", "4", "--batch-size", "4"]
TABLES = ("summary.csv", "genes.csv")


def arguments(data: Path, output: Path, *extra: str) -> list[str]:
    return ["perturb", "--checkpoint-path", str(DEMO), "--data-file", str(data), "--output-path", str(output)] + [
        "--device",
        "cpu",
        *PERTURBATIONS,
        *extra,
    ]


def assert_same_results(folder: Path, reference: Path) -> None:
    got, want = ad.read_h5ad(folder / "perturbations.h5ad"), ad.read_h5ad(reference / "perturbations.h5ad")
    assert list(got.obs_names) == list(want.obs_names) and list(got.var_names) == list(want.var_names)
    pd.testing.assert_frame_equal(got.obs, want.obs)
    for key in got.layers:
        assert (got.layers[key] != want.layers[key]).nnz == 0, key
    assert set(got.layers) == set(want.layers)
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_csv(folder / name), pd.read_csv(reference / name))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("whole")
    assert main(arguments(HELDOUT, output)) == 0
    return output


@pytest.mark.slow  # two fresh processes and a run in this one (about 60 s on two busy cores)
def test_killed_perturb_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
    output = tmp_path / "resumed"
    command = [sys.executable, "-m", "transcriptformer", *arguments(HELDOUT, output)]
    parts = output / ".perturbations.h5ad.parts"
    kill_after_some_units(command, parts)
    done = len(list(parts.glob("unit-*.npz")))
    assert not any((output / name).exists() for name in ("perturbations.h5ad", *TABLES))

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming: {done} of 25 units were already done" in resumed.stdout
    assert not parts.exists()
    assert_same_results(output, uninterrupted)


@pytest.mark.slow  # three fresh processes (about 40 s on two busy cores)
def test_two_processes_write_the_single_process_folder(uninterrupted, tmp_path):
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    command = [str(BIN / "transcriptformer"), *arguments(HELDOUT, tmp_path / "two"), "--num-gpus", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "(2 processes" in done.stdout
    assert ad.read_h5ad(tmp_path / "two" / "perturbations.h5ad").uns["transcriptformer"]["processes"] == 2
    assert_same_results(tmp_path / "two", uninterrupted)


def test_a_table_in_the_output_folder_is_kept_without_overwrite(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "genes.csv").write_text("the user's table\n")
    code, err = run_cli(capsys, *arguments(HELDOUT, output), "--dry-run")
    assert code == 0, err  # a dry run writes nothing, and reports the plan
    code, err = run_cli(capsys, *arguments(HELDOUT, output))
    assert_one_line_error(code, err, "perturb", "genes.csv exists", "--overwrite")
    assert (output / "genes.csv").read_text() == "the user's table\n"
    assert not (output / "perturbations.h5ad").exists() and not (output / "summary.csv").exists()


def test_the_tables_and_the_anndata_are_replaced_together_with_overwrite(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    for name in ("perturbations.h5ad", *TABLES):
        (output / name).write_text("old\n")
    data = tmp_path / "cells.h5ad"
    ad.read_h5ad(HELDOUT)[:8].write_h5ad(data)
    assert main(arguments(data, output, "--overwrite")) == 0
    summary = pd.read_csv(output / "summary.csv", index_col="perturbation")
    assert summary["n_cells"].tolist() == [8, 8]
    genes = pd.read_csv(output / "genes.csv")
    cells = ad.read_h5ad(output / "perturbations.h5ad")
    assert cells.n_obs == 16 and set(genes["perturbation"]) <= set(summary.index)
    expected = cells.uns["perturbation_genes"]
    np.testing.assert_allclose(genes["score"], expected["score"], equal_nan=True)
    # nothing temporary is left beside the outputs
    assert sorted(p.name for p in output.iterdir()) == sorted(
        [".perturbations.h5ad.lock", "perturbations.h5ad", *TABLES, "summary.parquet", "genes.parquet"]
    )
