"""A knock-out screen of every expressed gene of the 100 bundled held-out mouse brain cells, with and without reuse.

``transcriptformer screen`` end to end (reading, the model, statistics, the files), with prefix reuse and with
``--no-prefix-reuse``.

Each path runs in its own process (so that each has its own peak RSS); prints per path the job's time, the
(cell, gene) pairs and pairs/s, the peak RSS and the load average, then the prefix-reuse speed-up and the largest
difference between the two paths' pair effects. The machine may be shared: the load average says how much.

``--pairs N`` measures instead what a screen of N pairs costs once its units are done, in memory: the pairs of a
real screen (20 held-out cells, 30 genes each) copied under new cell names into unit files of 100,000 pairs, then
in one process the screen's merge as it runs (the gene statistics read a unit file at a time, the pairs merged into
one Parquet file a file at a time), and in another every pair in one table as the screen held them before (the
table, the statistics over it, the Parquet file and the ``.h5ad`` of a row per pair): peak RSS, time, bytes per
pair of the Parquet file.

    python benchmarks/screen.py                       # both paths, demo model, the 100 held-out cells
    python benchmarks/screen.py --max-genes-per-cell 20
    python benchmarks/screen.py --pairs 2000000       # the merge of 2 million pairs: streamed, and all in memory
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
import psutil

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


UNIT_PAIRS = 100_000


def write_units(folder: Path, n_pairs: int) -> list[Path]:
    """Unit files of ``n_pairs`` pairs, copies of a real screen's pairs under new cell names."""
    import anndata as ad

    import transcriptformer
    from transcriptformer.config import PredictConfig
    from transcriptformer.perturbation.screen import ScreenRun, screen_cells, write_pairs

    model = transcriptformer.load(CHECKPOINT, device="cpu")
    cells = model.tokenize(ad.read_h5ad(DATA)[:20].copy())
    import torch

    run = ScreenRun(
        model.model, PredictConfig(), torch.device("cpu"), True, np.full(len(model.checkpoint.gene_vocab), -1)
    )
    pairs = screen_cells(run, cells, "knock_out", None, 30)
    copies_per_unit = max(1, UNIT_PAIRS // len(pairs))
    effects = ["cosine_shift", "delta_log_likelihood", "delta_mean_log_likelihood"]
    rng = np.random.default_rng(0)
    files, written, copy = [], 0, 0
    while written < n_pairs:
        unit = pd.concat(
            [pairs.assign(cell=pairs["cell"] + f"-{copy + i}") for i in range(copies_per_unit)], ignore_index=True
        )
        unit[effects] *= 1 + 0.01 * rng.standard_normal((len(unit), len(effects)))  # copies differ, as cells do
        unit = unit.iloc[: n_pairs - written]
        files.append(folder / f"pairs-{len(files):06d}.parquet")
        write_pairs(unit, files[-1], with_goal=False)
        written, copy = written + len(unit), copy + copies_per_unit
    return files


def merge_one(folder: Path, streamed: bool) -> None:
    """The merge of the unit files of ``folder``, streamed or with every pair in memory; prints its figures."""
    import anndata as ad

    from transcriptformer.perturbation.screen import gene_statistics, merge_pair_files

    files = sorted(folder.glob("pairs-*.parquet"))
    imported = psutil.Process().memory_info().rss / 2**20
    started = time.perf_counter()
    output = folder / ("streamed" if streamed else "in_memory")
    output.mkdir()
    if streamed:
        table = gene_statistics(files, "cosine_shift")
        n_pairs = merge_pair_files(files, output / "screen_pairs.parquet", with_goal=False)
    else:
        pairs = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        pairs.index = pd.Index(pairs["gene_id"] + "|" + pairs["cell"])
        table = gene_statistics(pairs, "cosine_shift")
        pairs.to_parquet(output / "screen_pairs.parquet")
        ad.AnnData(obs=pairs).write_h5ad(output / "screen.h5ad")
        n_pairs = len(pairs)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = (output / "screen_pairs.parquet").stat().st_size
    name = "streamed, a unit file at a time" if streamed else "every pair in memory"
    print(f"{name}: {n_pairs:,} pairs in {len(files)} unit files, {len(table):,} genes")
    print(f"  time {seconds:.1f} s, peak RSS {peak:.0f} MiB ({imported:.0f} MiB after the imports)")
    print(f"  Parquet file of the pairs: {size / n_pairs:.1f} bytes per pair")
    print(f"  load average {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-genes-per-cell", type=int, default=0, help="0: every expressed gene")
    parser.add_argument("--one", choices=["prefix", "full"], help=argparse.SUPPRESS)  # a path in this process
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, help="measure the merge of this many pairs instead of a screen")
    parser.add_argument("--merge", choices=["streamed", "in_memory"], help=argparse.SUPPRESS)  # in this process
    args = parser.parse_args()
    if args.merge:
        merge_one(args.output, args.merge == "streamed")
        return
    if args.pairs:
        with tempfile.TemporaryDirectory() as folder:
            write_units(Path(folder), args.pairs)
            for way in ("streamed", "in_memory"):
                subprocess.run([sys.executable, __file__, "--merge", way, "--output", folder], check=True)
        return
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
