"""Wall time of ``transcriptformer evaluate`` on many cells, resampled from the bundled real ones.

The cells are drawn with replacement from ``test/data/mouse_brain_1k.h5ad`` and each count is thinned
binomially (each molecule kept with probability 0.8), so that no two cells are identical while their
genes, depths and labels stay those of real cells. A ``batch`` column splits them in two at random. The command
runs in a fresh process, as a user types it, with each progress line timed from its start; the CPU time and the
load average tell how much of the machine it had.

    python benchmarks/evaluate_scale.py --cells 100000                    # PCA baseline, batch mixing
    python benchmarks/evaluate_scale.py --cells 20000 --checkpoint-path models/demo-mouse-brain
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "test" / "data" / "mouse_brain_1k.h5ad"


def resampled_cells(n_cells: int, seed: int) -> ad.AnnData:
    """``n_cells`` cells drawn from the bundled ones, their counts thinned binomially."""
    source = ad.read_h5ad(SOURCE)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, source.n_obs, n_cells)
    counts = sp.csr_matrix(source.X)[rows]
    counts.data = rng.binomial(counts.data.astype(np.int64), 0.8).astype(np.float32)
    counts.eliminate_zeros()
    obs = source.obs.iloc[rows][["cell_type", "assay"]].reset_index(drop=True)
    obs.index = [f"cell{i}" for i in range(n_cells)]
    obs["batch"] = rng.choice(["a", "b"], n_cells)
    return ad.AnnData(counts, obs=obs, var=source.var)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--checkpoint-path", action="append", default=[])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "cells.h5ad"
        resampled_cells(args.cells, args.seed).write_h5ad(data)
        command = [sys.executable, "-m", "transcriptformer", "evaluate", "--data-file", str(data)]
        command += ["--label-key", "cell_type", "--batch-key", "batch", "--output-path", str(Path(folder) / "out")]
        for path in args.checkpoint_path:
            command += ["--checkpoint-path", path]
        load = f"{os.getloadavg()[0]:.1f}"
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        for line in process.stdout:
            print(f"{time.perf_counter() - start:7.1f} s  {line.rstrip()}", flush=True)
        if process.wait():
            sys.exit(process.returncode)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = usage.ru_utime + usage.ru_stime
        print(
            f"{args.cells} cells: {time.perf_counter() - start:.0f} s wall, {cpu:.0f} s CPU, "
            f"peak RSS {usage.ru_maxrss / 1024:.0f} MB; load average before and after: {load}, {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
