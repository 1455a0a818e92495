"""``evaluate``, ``finetune`` and ``perturb`` killed (SIGTERM) at several points.

The previous output stays whole, or nothing that looks complete is left; a second run on the same output is refused
while the first holds it; a rerun works. The commands run as processes here (a signal is under test).
"""

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import transcriptformer
from conftest import DATA_DIR, REFERENCE_DIR
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.cli import main
from transcriptformer.engine.output import TEMPORARY_SUFFIX
from transcriptformer.evaluation.report import REPORT_FILES, RESULTS_FILE
from transcriptformer.model.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from transcriptformer.perturbation.output import table_files
from transcriptformer.training.trainer import INTERRUPTED_DIR

SIGTERM_EXIT = 128 + signal.SIGTERM


def start(args: list, log: Path) -> subprocess.Popen:
    """``transcriptformer ARGS`` as a process, what it prints (progress and errors) written to ``log``."""
    command = [sys.executable, "-m", "transcriptformer", *map(str, args)]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)


def terminate_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> int:
    """Send SIGTERM once ``ready()`` (or, if the process ends first, nothing); the exit code."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and not ready():
        assert time.monotonic() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.01)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout=120)


def said(log: Path, words: str) -> Callable[[], bool]:
    return lambda: words in log.read_text()


def beside(output: Path, suffix: str) -> Callable[[], bool]:
    """Whether a folder ``.<output>.<pid><suffix>`` is beside ``output``."""
    prefix = f".{output.name}."
    return lambda: any(p.name.startswith(prefix) and p.name.endswith(suffix) for p in output.parent.iterdir())


@pytest.fixture(scope="module")
def labelled_cells(tmp_path_factory) -> Path:
    """200 mouse brain cells with an 8-dimensional embedding in obsm."""
    cells = ad.read_h5ad(DATA_DIR / "mouse_brain_1k.h5ad")[:200].copy()
    cells.obsm["X_random"] = np.random.default_rng(0).normal(size=(cells.n_obs, 8)).astype(np.float32)
    path = tmp_path_factory.mktemp("cells") / "cells.h5ad"
    cells.write_h5ad(path)
    return path


def report_of(output: Path) -> dict[str, bytes] | None:
    """The report's files, or ``None`` where there is none; a report lacking a file fails the test."""
    if not output.exists():
        return None
    files = {name: (output / name).read_bytes() for name in REPORT_FILES if (output / name).exists()}
    assert sorted(files) == sorted(REPORT_FILES), f"an incomplete report: {sorted(files)}"
    json.loads(files[RESULTS_FILE])
    return files


@pytest.mark.slow  # three evaluations run to the end, and four started: over a minute on two cores
def test_evaluate_killed_at_any_point_leaves_the_previous_report_or_none(labelled_cells, tmp_path, capsys):
    output = tmp_path / "evaluation"
    args = ["evaluate", "--data-file", labelled_cells, "--label-key", "cell_type", "--obsm-key", "X_random",
            "--output-path", output]  # fmt: skip
    code = terminate_when(start(args, tmp_path / "first.log"), said(tmp_path / "first.log", "evaluating"))
    assert code == -signal.SIGTERM
    assert report_of(output) is None  # killed while computing: nothing

    assert main([*map(str, args), "--quiet"]) == 0  # the rerun works
    previous = report_of(output)
    points = {"starting": lambda: True, "computing": said(tmp_path / "computing.log", "evaluating pca"),
              "writing": beside(output, ".partial")}  # fmt: skip
    for point, ready in points.items():
        process = start([*args, "--overwrite"], tmp_path / f"{point}.log")
        if point == "computing":  # while it holds the output, a second run is refused
            while not ready():
                time.sleep(0.01)
            code, err = run_cli(capsys, *args, "--overwrite")
            assert_one_line_error(code, err, "evaluate", "is being written by another run", "--output-path")
        terminate_when(process, ready)
        assert report_of(output) in (previous, None), point  # never a mix, never a report without its figures

    assert main([*map(str, args), "--overwrite", "--quiet"]) == 0
    assert report_of(output) is not None
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".evaluation")) == [".evaluation.lock"]


FINETUNE = ["finetune", "--checkpoint-path", REFERENCE_DIR, "--device", "cpu", "--batch-size", "8", "--lora-r", "2"]


def adapters_of(output: Path) -> dict[str, bytes] | None:
    """The adapter files that make ``output`` loadable, or ``None`` where it does not load."""
    if not (output / ADAPTER_CONFIG_FILE).exists():
        return None
    return {name: (output / name).read_bytes() for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)}


@pytest.mark.slow  # a fine-tuning run to the end and three started: about a minute on two cores
def test_finetune_killed_at_any_point_keeps_the_previous_adapters_or_leaves_none_that_load(many_cells, tmp_path):
    output = tmp_path / "adapters"
    args = [*FINETUNE, "--train-files", many_cells, "--output-path", output]
    started = time.monotonic()
    code = terminate_when(start(args, tmp_path / "loading.log"), lambda: time.monotonic() > started + 3)
    assert code == -signal.SIGTERM  # killed while starting and reading the cells
    assert adapters_of(output) is None

    assert main([*map(str, args), "--max-steps", "2", "--quiet"]) == 0
    previous = adapters_of(output)
    log = tmp_path / "training.log"
    checkpoints = tmp_path / "run" / "checkpoints"  # a run folder of its own: none of the previous run's there
    process = start([*args, "--overwrite", "--checkpoint-every-n-steps", "2", "--run-dir", tmp_path / "run"], log)
    code = terminate_when(process, lambda: checkpoints.is_dir() and any(checkpoints.glob("epoch=*.ckpt")))
    assert code == SIGTERM_EXIT, log.read_text()  # not 0: the run did not finish
    assert "training stopped by SIGTERMException" in log.read_text()
    assert adapters_of(output) == previous  # what it trained is in interrupted/, beside the previous adapters
    assert adapters_of(output / INTERRUPTED_DIR) is not None

    process = start([*args, "--overwrite", "--max-steps", "2"], tmp_path / "saving.log")
    terminate_when(process, lambda: any(output.glob(".partial-*")))
    if adapters_of(output) is not None:  # the previous adapters, or the new ones, each whole
        transcriptformer.load(REFERENCE_DIR, device="cpu", adapter=output)

    assert main([*map(str, args), "--overwrite", "--max-steps", "2", "--quiet"]) == 0
    assert not list(output.glob(".partial-*"))
    transcriptformer.load(REFERENCE_DIR, device="cpu", adapter=output)


DEMO = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"
PERTURB = ["perturb", "--checkpoint-path", DEMO, "--data-file", DATA_DIR / "demo_mouse_brain_heldout.h5ad",
           "--device", "cpu", "--chunk-size", "4", "--batch-size", "4"]  # fmt: skip


def perturbations_of(output: Path) -> set[str] | None:
    """The perturbations of the ``.h5ad`` and of every table beside it (one run's), or ``None`` where there is none.

    A folder holding some of the files, or files of two runs, fails the test.
    """
    files = [output / "perturbations.h5ad", *(output / name for name in table_files())]
    present = [file.name for file in files if file.exists()]
    if not present:
        return None
    assert len(present) == len(files), f"an incomplete output: {present}"
    found = set(ad.read_h5ad(files[0]).obs["perturbation"])
    for name in ("summary.csv", "genes.csv"):
        assert set(pd.read_csv(output / name)["perturbation"]) == found, f"{name} is of another run"
    return found


@pytest.mark.slow  # two perturb runs to the end and three started: about a minute on two cores
def test_perturb_killed_at_any_point_leaves_one_runs_files(tmp_path):
    output = tmp_path / "perturbed"
    assert main([*map(str, PERTURB), "--knock-out", "Pou3f3", "--output-path", str(output), "--quiet"]) == 0
    previous = perturbations_of(output)
    assert previous == {"ko:Pou3f3"}
    args = [*PERTURB, "--knock-out", "Gad2", "--output-path", output, "--overwrite"]  # another run's files
    points = {
        "starting": lambda: True,
        "computing": lambda: any((output / ".perturbations.h5ad.parts").glob("unit-*")),
        "writing": beside(output / "perturbations", TEMPORARY_SUFFIX),  # the new .h5ad, before the renames
    }
    for point, ready in points.items():
        terminate_when(start(args, tmp_path / f"{point}.log"), ready)
        assert perturbations_of(output) in (previous, {"ko:Gad2"}), point  # one run's files, never a mix

    assert main([*map(str, args), "--quiet"]) == 0
    assert perturbations_of(output) == {"ko:Gad2"}
