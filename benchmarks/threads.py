"""The main job's wall time against torch's CPU thread count, on an idle machine and under a competing CPU load.

Each run is the README's main job (or ``--data FILE``) in a fresh process, as a user types it, with
``OMP_NUM_THREADS`` set to each count of ``--threads`` (``default``: unset, the package chooses; ``all``: every
CPU of the machine, torch's own default). A load of N starts N processes that spin on a CPU each for the whole
measurement. Runs are interleaved (one of each setting per round) so that a change in the machine's other work
spreads over all settings, and each run reports how many CPUs other processes kept busy meanwhile.

    python benchmarks/threads.py                                  # loads 0, 1, 2; default, 1, 2, all threads
    python benchmarks/threads.py --data test/data/mouse_brain_1k.h5ad --loads 0 1 --repeats 5
    python benchmarks/threads.py --src ../other-checkout/src      # measure another checkout's package
    python benchmarks/threads.py --loads 0 --pause 90             # idle machine: the 1-minute load average decays

Without ``--pause`` each run starts right after the previous one ended, as a user's next command does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import psutil

from transcriptformer.runtime import usable_cpus

ROOT = Path(__file__).resolve().parents[1]
SPIN = "while True: pass"


@dataclass
class Run:
    """One run of the job."""

    seconds: float
    threads: int | None  # what the run recorded in uns["transcriptformer"], when it records it
    others: float  # CPUs that processes other than the job and the spinners kept busy during the run


def busy_cpu_seconds() -> float:
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


def own_cpu_seconds(spinners: list[psutil.Process]) -> float:
    """CPU seconds of this script's finished children (the jobs) and of the spinners."""
    children = os.times()
    return children.children_user + children.children_system + sum(sum(p.cpu_times()[:2]) for p in spinners)


def run_job(job: list[str], env: dict[str, str], output: Path, spinners: list[psutil.Process]) -> Run:
    busy, own = busy_cpu_seconds(), own_cpu_seconds(spinners)
    started = time.perf_counter()
    done = subprocess.run(job, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(job)} failed:\n{done.stderr}")
    others = (busy_cpu_seconds() - busy) - (own_cpu_seconds(spinners) - own)
    metadata = ad.read_h5ad(output).uns["transcriptformer"]
    threads = metadata.get("cpu_threads")
    return Run(seconds, None if threads is None else int(threads), max(0.0, others / seconds))


def environment(setting: str, src: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(src)
    if setting != "default":
        env["OMP_NUM_THREADS"] = str(os.cpu_count()) if setting == "all" else setting
    return env


def measure_load(
    load: int, settings: list[str], job: list[str], output: Path, repeats: int, src: Path, pause: float
) -> None:
    spinners = [psutil.Process(subprocess.Popen([sys.executable, "-c", SPIN]).pid) for _ in range(load)]
    try:
        time.sleep(1.0)
        runs: dict[str, list[Run]] = {s: [] for s in settings}
        for _ in range(repeats):
            for setting in settings:
                time.sleep(pause)
                runs[setting].append(run_job(job, environment(setting, src), output, spinners))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    for setting, results in runs.items():
        seconds = [r.seconds for r in results]
        chosen = sorted({r.threads for r in results if r.threads is not None})
        print(
            f"{load:>4} {setting:>8} {statistics.median(seconds):>8.2f} {min(seconds):>6.2f} {max(seconds):>6.2f} "
            f"{'/'.join(map(str, chosen)) or '-':>8} {statistics.median(r.others for r in results):>7.2f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="test/data/demo_mouse_brain_heldout.h5ad")
    parser.add_argument("--checkpoint", default="models/demo-mouse-brain")
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="spinning processes")
    parser.add_argument("--threads", nargs="+", default=["default", "1", "2", "all"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds of rest before each run")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the package to measure")
    args = parser.parse_args()
    print(
        f"{args.data}, {os.cpu_count()} CPUs ({usable_cpus()} usable), load average "
        f"{os.getloadavg()[0]:.2f} at the start; median, min and max of {args.repeats} runs"
    )
    print(f"{'load':>4} {'threads':>8} {'median s':>8} {'min':>6} {'max':>6} {'chosen':>8} {'others':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        job = [
            sys.executable, "-m", "transcriptformer", "inference", "--checkpoint-path", args.checkpoint,
            "--data-file", args.data, "--output-keys", "embeddings", "llh", "--output-path", tmp, "--overwrite",
        ]  # fmt: skip
        for load in args.loads:
            measure_load(
                load, args.threads, job, Path(tmp) / "embeddings.h5ad", args.repeats, args.src.resolve(), args.pause
            )


if __name__ == "__main__":
    main()
