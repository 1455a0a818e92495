"""A run killed mid-way and resumed gives the file of an uninterrupted run, with nothing lost or duplicated."""

import os
import signal
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pytest


def command(reference_dir, data, output, *extra):
    return [
        sys.executable, "-m", "transcriptformer", "inference",
        "--checkpoint-path", str(reference_dir), "--data-file", str(data), "--output-path", str(output),
        "--output-keys", "embeddings", "llh", "mu", "--batch-size", "1", "--chunk-size", "16", *extra,
    ]  # fmt: skip


def kill_after_some_units(cmd, parts_dir, units=3):
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if parts_dir.exists() and len(list(parts_dir.glob("unit-*.npz"))) >= units:
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(reference_dir, many_cells, tmp_path):
    subprocess.run(command(reference_dir, many_cells, tmp_path / "whole"), check=True, capture_output=True)
    parts = tmp_path / "resumed" / ".embeddings.h5ad.parts"
    kill_after_some_units(command(reference_dir, many_cells, tmp_path / "resumed"), parts)
    done = len(list(parts.glob("unit-*.npz")))
    assert not (tmp_path / "resumed" / "embeddings.h5ad").exists()

    resumed = subprocess.run(
        command(reference_dir, many_cells, tmp_path / "resumed", "--resume"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming: {done} of 80 units were already done" in resumed.stdout
    assert not parts.exists()
    whole = ad.read_h5ad(tmp_path / "whole" / "embeddings.h5ad")
    again = ad.read_h5ad(tmp_path / "resumed" / "embeddings.h5ad")
    assert list(again.obs_names) == list(whole.obs_names) and again.n_obs == 1280
    np.testing.assert_array_equal(again.obsm["X_transcriptformer"], whole.obsm["X_transcriptformer"])
    np.testing.assert_array_equal(again.obs["llh"], whole.obs["llh"])
    assert (again.layers["mu"] != whole.layers["mu"]).nnz == 0


def test_resume_refuses_a_run_with_other_settings(reference_dir, many_cells, tmp_path):
    parts = tmp_path / ".embeddings.h5ad.parts"
    kill_after_some_units(command(reference_dir, many_cells, tmp_path), parts, units=1)
    other = subprocess.run(
        command(reference_dir, many_cells, tmp_path, "--resume", "--clip-counts", "5"), capture_output=True, text=True
    )
    assert other.returncode != 0
    assert "had other settings, inputs or weights; run without --resume to start over" in other.stderr
    assert parts.exists()  # the interrupted run's units are kept
