"""``--precision bf16-mixed`` against ``--precision 32`` as a user runs them: the CLI's own cells/s, fresh processes.

Builds a random-weight checkpoint of a named size (``bench_inference.SIZES``; ``mid`` by default: 6 layers, 512 wide)
whose vocabulary holds the genes of the real human cells, and runs ``python -m transcriptformer inference`` on the
first N cells for each ``--cells`` count, each run a fresh process. bf16 and fp32 runs alternate; the best of
``--runs`` is reported (the CLI's line ``N cells in X s (Y cells/s)``, and the process wall time), with the bf16/fp32
ratios and the load average. ``--threads N`` sets ``OMP_NUM_THREADS`` for both (default: the CLI's own choice).

The compiled bf16 score loop is kept in the user's cache folder (``$TRANSCRIPTFORMER_CACHE``, else
``~/.cache/transcriptformer``). ``--empty-cache`` points the runs at a new, empty cache folder instead, as on a new
machine: a bf16 run long enough to pay for it builds the loop, and later runs load it. The first bf16 run of each
cell count is printed apart ("first bf16"). Example (about 8 minutes on 2 quiet cores)::

    python benchmarks/bf16_cli.py --empty-cache
    python benchmarks/bf16_cli.py --cells 16 256 --runs 3
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import add_cli_run_arguments, build_checkpoint, environment_with_threads, gene_ids_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CELLS_PER_S = re.compile(r"(\d+) cells in ([\d.]+) s \(([\d.]+) cells/s\)")
PRECISIONS = ("bf16-mixed", "32")


def run_inference(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """The CLI's cells/s (cells over its seconds, more digits than it prints) and the wall seconds of the process."""
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    found = CELLS_PER_S.search(result.stdout + result.stderr)
    if found is None:
        raise SystemExit(f"no cells/s line in the output of {' '.join(command)}:\n{result.stdout[-2000:]}")
    return int(found.group(1)) / float(found.group(2)), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_run_arguments(parser)
    parser.add_argument("--cells", type=int, nargs="+", default=[16, 64, 256], help="cell counts, one table row each")
    parser.add_argument("--runs", type=int, default=2, help="runs of each precision per cell count (best reported)")
    parser.add_argument("--empty-cache", action="store_true", help="start from a new, empty cache folder")
    args = parser.parse_args()

    env = environment_with_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.empty_cache:
            env["TRANSCRIPTFORMER_CACHE"] = str(Path(tmp) / "cache")
        all_cells = ad.read_h5ad(args.data)[: max(args.cells)].copy()
        checkpoint = build_checkpoint(args.size, gene_ids_of(all_cells), Path(tmp), args.seq_len)
        first_bf16: dict[int, float] = {}
        best: dict[tuple[int, str], tuple[float, float]] = {}
        for n_cells in args.cells:
            data = Path(tmp) / f"cells_{n_cells}.h5ad"
            all_cells[:n_cells].copy().write_h5ad(data)
            for run in range(args.runs):
                for precision in PRECISIONS:
                    output = Path(tmp) / f"out_{n_cells}_{precision}_{run}"
                    command = [sys.executable, "-m", "transcriptformer", "inference", "--checkpoint-path"]
                    command += [str(checkpoint), "--data-file", str(data), "--gene-col-name", "ensembl_id"]
                    command += ["--precision", precision, "--output-path", str(output)]
                    speed, wall = run_inference(command, env, Path(tmp) / "run.log")
                    print(
                        f"  {n_cells} cells, precision {precision}: {speed:.2f} cells/s, wall {wall:.1f} s", flush=True
                    )
                    if precision != "32":
                        first_bf16.setdefault(n_cells, speed)
                    key = (n_cells, precision)
                    best[key] = max(best.get(key, (0.0, 0.0)), (speed, -wall))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cache = "a new, empty cache folder" if args.empty_cache else "the user's cache folder as it was"
    threads = f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}"
    print(f"\n{args.size} model, CPU, {threads}, fresh processes, best of {args.runs}, {cache}")
    print(f"load average after the runs: {load}")
    print_table(args.cells, best, first_bf16)


def print_table(
    cell_counts: list[int], best: dict[tuple[int, str], tuple[float, float]], first_bf16: dict[int, float]
) -> None:
    """One row per cell count: best cells/s of each precision, their ratio, the first bf16 run's, best walls."""
    columns = ("cells", "fp32 cells/s", "bf16 cells/s", "ratio", "first bf16", "ratio", "fp32 wall s", "bf16 wall s")
    print(" ".join(f"{name:>12}" for name in columns))
    for n_cells in cell_counts:
        (fp32, fp32_wall), (bf16, bf16_wall) = best[n_cells, "32"], best[n_cells, "bf16-mixed"]
        first = first_bf16[n_cells]
        row = (
            f"{n_cells}",
            f"{fp32:.2f}",
            f"{bf16:.2f}",
            f"{bf16 / fp32:.2f}x",
            f"{first:.2f}",
            f"{first / fp32:.2f}x",
        )
        print(" ".join(f"{value:>12}" for value in (*row, f"{-fp32_wall:.1f}", f"{-bf16_wall:.1f}")))


if __name__ == "__main__":
    main()
