"""End to end, as a user runs them: ``transcriptformer inference`` of this project against the original release's.

Builds a random-weight checkpoint of a named size (``bench_inference.SIZES``; ``mid`` by default: 6 layers, 512 wide)
whose vocabulary holds the genes of the first ``--cells`` real human cells, writes those cells to an ``.h5ad``, and
runs both command lines on them, each as a fresh process: process wall time, CPU time (user + system, of the process
and its children) and peak RSS, everything included (Python's start, imports, reading, the model, writing). Runs
alternate between the two commands; the fastest of ``--runs`` is reported, with the load average beside it.

The original release is installed apart, e.g. (its pins ask for torch 2.5.1; ``--no-deps`` and a ``.pth`` file
borrow torch and the rest of this project's environment instead; it writes its output only with its own anndata
and pandas, which need zarr 2)::

    python -m venv /tmp/tf061
    /tmp/tf061/bin/pip install --no-deps transcriptformer==0.6.1 anndata==0.11.4 pandas==2.2.2 "zarr<3" \
        numcodecs==0.13.1 asciitree fasteners timeout-decorator pynvml boto3
    echo "$(python -c 'import site; print(site.getsitepackages()[0])')" > /tmp/tf061/lib/python3.11/site-packages/zz.pth

    python benchmarks/vs_original.py --original /tmp/tf061/bin/transcriptformer --cells 16

The original compiles its attention with ``torch.compile`` (inductor) in every process; inductor keeps the
compiled kernels in its cache folder (``TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_<user>``), so a
user's first run compiles them and later runs load them. The original runs both ways: ``cached`` (its default
cache folder, filled by an untimed run first) and ``first run`` (an empty cache folder for each run). This project
compiles nothing in fp32 on the CPU.

With its own pins (torch 2.5.1) the original aborts on the CPU on cells that fill ``seq_len`` (an index out of
bounds in the compiled block mask: "index out of bounds: tmp2 < 2047"), which the 16 first cells have; hence the
borrowed torch above.

``--threads N`` sets ``OMP_NUM_THREADS`` for both (default: each command's own choice).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import add_cli_run_arguments, build_checkpoint, environment_with_threads, gene_ids_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_CACHED = "original 0.6.1, cached kernels"
ORIGINAL_FIRST = "original 0.6.1, first run"


def measure(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of one run of ``argv``; its output into ``log``."""
    with log.open("w") as output:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{log.read_text()[-3000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, help="the original release's transcriptformer executable")
    add_cli_run_arguments(parser)
    parser.add_argument("--cells", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()

    env = environment_with_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cells = ad.read_h5ad(args.data)[: args.cells].copy()
        cells.obs["sample"] = Path(args.data).stem  # the original writes no output for cells without obs columns
        data = Path(tmp) / "cells.h5ad"
        cells.write_h5ad(data)
        checkpoint = build_checkpoint(args.size, gene_ids_of(cells), Path(tmp), args.seq_len)
        common = ["--checkpoint-path", str(checkpoint), "--data-file", str(data), "--gene-col-name", "ensembl_id"]
        common += ["--remove-duplicate-genes", "--batch-size", "8", "--precision", "32", "--device", "cpu"]
        original_env = {name: value for name, value in env.items() if name != "PYTHONPATH"}  # its own package
        original = [args.original, "inference", *common]
        commands = {
            "this project": ([sys.executable, "-m", "transcriptformer", "inference", *common], env),
            ORIGINAL_CACHED: (original, original_env),
            ORIGINAL_FIRST: (original, original_env),
        }
        # Untimed: fills the original's default compile cache, as a user's earlier runs have.
        measure([*original, "--output-path", str(Path(tmp) / "warm-up")], original_env, Path(tmp) / "warm-up.log")
        best: dict[str, tuple[float, float, float]] = {}
        for run in range(args.runs):
            for index, (name, (argv, environment)) in enumerate(commands.items()):
                output = Path(tmp) / f"out_{index}_{run}"
                if name == ORIGINAL_FIRST:
                    environment = {**environment, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=tmp)}
                result = measure([*argv, "--output-path", str(output)], environment, Path(tmp) / f"{index}.log")
                written = ad.read_h5ad(next(output.glob("*.h5ad")), backed="r")
                if written.n_obs != args.cells or "embeddings" not in written.obsm:
                    raise SystemExit(f"{name} wrote {written.n_obs} cells, obsm {list(written.obsm)}")
                best[name] = min(best.get(name, result), result)
    print(f"{args.cells} cells, {args.size} model, fp32, CPU, OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}")
    print(f"load average after the runs: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'command':<34} {'wall s':>8} {'CPU s':>8} {'peak MiB':>9}")
    for name, (wall, cpu, mib) in best.items():
        print(f"{name:<34} {wall:>8.1f} {cpu:>8.1f} {mib:>9.0f}")
    ours = best["this project"]
    for name in (ORIGINAL_CACHED, ORIGINAL_FIRST):
        original = best[name]
        print(f"ratio {name} / this project: wall {original[0] / ours[0]:.1f}x, CPU {original[1] / ours[1]:.1f}x")


if __name__ == "__main__":
    main()
