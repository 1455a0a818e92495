"""Shared fixtures: the reference checkpoint and its expected outputs, bundled under test/data."""

import os
from pathlib import Path

import anndata as ad
import numpy as np
import platformdirs
import pytest

import transcriptformer
from transcriptformer.runtime import usable_cpus, use_cpu_threads

# numba (scanpy's neighbours, UMAP) keeps what it compiles with cache=True in one folder for every test run and
# every process a test starts, wherever the package is installed. Set before a test module imports numba.
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(platformdirs.user_cache_dir("transcriptformer")) / "numba"))
# torch's CPU threads for the tests' own work, as a command sets them: on a busy machine, more threads than idle
# CPUs make every parallel operation wait for a paused thread.
use_cpu_threads()


# Workers of `-n auto` at most: each holds its own torch and fixtures (about 1.5 GB), and with a file's tests in one
# worker, the largest files (a tenth of the suite) leave more workers idle.
MAX_WORKERS = 8


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` (pyproject.toml's addopts): one pytest-xdist worker per CPU this process may use, up to MAX_WORKERS.

    Its affinity and container quota are counted, as a run counts them, where xdist would count the machine's cores.
    """
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    return min(usable_cpus(), MAX_WORKERS)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's OpenMP (torch) and BLAS threads get the worker's share of the CPUs.

    Set here, in the process that starts the workers, so that a worker has it before it imports numpy or torch, and
    passes it on to the processes its tests start. An OMP_NUM_THREADS of the user's own is kept.
    """
    workers = getattr(config.option, "numprocesses", None)
    if workers:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // workers)))


DATA_DIR = Path(__file__).parent / "data"
REFERENCE_DIR = DATA_DIR / "reference_tiny"
REFERENCE_INPUT = REFERENCE_DIR / "input.h5ad"
TRAIN_CONFIG = DATA_DIR.parent.parent / "conf" / "train.yaml"
# The outputs that the original implementation computed for the reference cells (expected.npz).
PARITY_OUTPUTS = ("embeddings", "llh", "gene_llh", "mu")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def reference_input() -> Path:
    return REFERENCE_INPUT


@pytest.fixture(scope="session")
def expected() -> dict[str, np.ndarray]:
    with np.load(REFERENCE_DIR / "expected.npz") as npz:
        return dict(npz)


@pytest.fixture(scope="session")
def reference_model() -> transcriptformer.TranscriptFormerModel:
    return transcriptformer.load(REFERENCE_DIR, device="cpu")


def tiny_train_overrides(output: Path, *overrides: str) -> list[str]:
    """Hydra overrides of conf/train.yaml: a model of the reference size, trained on the reference cells."""
    return [
        "model_config=tiny",
        f"output_path={output}",
        f"data.train_files=[{REFERENCE_INPUT}]",
        f"data_config.esm2_mappings=[{REFERENCE_DIR / 'vocabs' / 'mus_musculus_gene.h5'}]",
        "data_config.aux_cols=[assay]",
        "data.batch_size=8",
        "trainer.device=cpu",
        "trainer.log_every_n_steps=1",
        *overrides,
    ]


@pytest.fixture(scope="session")
def many_cells(tmp_path_factory, reference_input) -> Path:
    """1280 real cells (the reference cells, 20 times over): a run that lasts long enough to be caught running."""
    cells = ad.read_h5ad(reference_input)
    many = ad.concat([cells] * 20, merge="same")
    many.obs_names = [f"{name}-{i // 64}" for i, name in enumerate(many.obs_names)]
    path = tmp_path_factory.mktemp("many") / "many.h5ad"
    many.write_h5ad(path)
    return path


def assert_no_output(output: Path) -> None:
    """Nothing that looks like a finished result: the output folder may exist (with the run's lock file), no .h5ad."""
    if output.is_dir():
        assert not list(output.rglob("*.h5ad")), list(output.rglob("*"))
    else:
        assert not output.exists()
