"""Start-up of the command line and the README's main job: wall time and peak memory of each command.

Runs each command in a fresh process (as a user would type it) and reads the process' own resource usage, so the
figures include Python's start and every import. The main job embeds and scores the 100 bundled held-out cells
with the demo model.

    python benchmarks/startup.py            # 3 runs of each, the fastest reported
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("inference", "train", "finetune", "merge-adapters", "download", "download-data", "doctor", "build-vocab")


def measure(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MiB) of one run of ``argv``."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed")
    return seconds, usage.ru_maxrss / 1024


def best_of(argv: list[str], runs: int) -> tuple[float, float]:
    results = [measure(argv) for _ in range(runs)]
    return min(r[0] for r in results), min(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "transcriptformer"]
    print(f"{'command':<42} {'wall s':>7} {'peak MiB':>9}")
    for extra in (["--help"], ["--version"], *[[name, "--help"] for name in COMMANDS]):
        seconds, mib = best_of([*cli, *extra], args.runs)
        print(f"{'transcriptformer ' + ' '.join(extra):<42} {seconds:>7.2f} {mib:>9.0f}")
    with tempfile.TemporaryDirectory() as tmp:
        job = [
            *cli, "inference", "--checkpoint-path", "models/demo-mouse-brain",
            "--data-file", "test/data/demo_mouse_brain_heldout.h5ad", "--output-keys", "embeddings", "llh",
            "--output-path", tmp, "--overwrite",
        ]  # fmt: skip
        seconds, mib = best_of(job, args.runs)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'README main job (demo model, 100 cells)':<42} {seconds:>7.2f} {mib:>9.0f}")


if __name__ == "__main__":
    main()
