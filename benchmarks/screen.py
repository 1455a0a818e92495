"""A knock-out screen of every expressed gene of the 100 bundled held-out mouse brain cells, with and without reuse.

``transcriptformer screen`` end to end (reading, the model, statistics, the files), with prefix reuse and with
``--no-prefix-reuse``.

Each path runs in its own process (so that each has its own peak RSS); prints per path the job's time, the
(cell, gene) pairs and pairs/s, the peak RSS and the load average, then the prefix-reuse speed-up and the largest
difference between the two paths' pair effects. The machine may be shared: the load average says how much.

    python benchmarks/screen.py                       # both paths, demo model, the 100 held-out cells
    python benchmarks/screen.py --max-genes-per-cell 20
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "models" / "demo-mouse-brain"
DATA = ROOT / "test" / "data" / "demo_mouse_brain_heldout.h5ad"


def run_one(output: Path, prefix_reuse: bool, max_genes: int) -> None:
    """One screen in this process; prints its figures."""
    import torch

    from transcriptformer.cli import main

    flag = "--prefix-reuse" if prefix_reuse else "--no-prefix-reuse"
    argv = ["screen", "--checkpoint-path", str(CHECKPOINT), "--data-file", str(DATA), "--knock-out", "all", flag]
    argv += ["--output-path", str(output), "--max-genes-per-cell", str(max_genes), "--device", "cpu", "--quiet"]
    load_before = os.getloadavg()
    started = time.perf_counter()
    assert main(argv) == 0
    seconds = time.perf_counter() - started
    pairs = pd.read_parquet(output / "screen_pairs.parquet")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    name = "prefix reuse" if prefix_reuse else "straightforward"
    print(f"{name}: {len(pairs):,} pairs of {pairs['cell'].nunique()} cells")
    print(f"  time {seconds:.1f} s, {len(pairs) / seconds:.1f} pairs/s, peak RSS {peak:.0f} MiB")
    print(f"  torch threads {torch.get_num_threads()}")
    print(f"  load average before {load_before}, after {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-genes-per-cell", type=int, default=0, help="0: every expressed gene")
    parser.add_argument("--one", choices=["prefix", "full"], help=argparse.SUPPRESS)  # a path in this process
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.output, args.one == "prefix", args.max_genes_per_cell)
        return
    with tempfile.TemporaryDirectory() as folder:
        seconds = {}
        for path in ("prefix", "full"):
            started = time.perf_counter()
            command = [sys.executable, __file__, "--one", path, "--output", f"{folder}/{path}"]
            subprocess.run([*command, "--max-genes-per-cell", str(args.max_genes_per_cell)], check=True)
            seconds[path] = time.perf_counter() - started
        fast = pd.read_parquet(f"{folder}/prefix/screen_pairs.parquet")
        full = pd.read_parquet(f"{folder}/full/screen_pairs.parquet")
        print(f"prefix-reuse speed-up (whole processes): {seconds['full'] / seconds['prefix']:.2f}x")
        for key in ("cosine_shift", "delta_log_likelihood", "delta_mean_log_likelihood"):
            difference = np.abs(fast[key] - full[key]).max() / np.abs(full[key]).max()
            print(f"  largest difference of {key}, relative to its largest value: {difference:.1e}")


if __name__ == "__main__":
    main()
