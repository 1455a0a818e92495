"""Where and how the model runs: the device, the numeric precision, the CPU threads and the user's cache folder.

This module is at the bottom of the package (it imports nothing of it) and imports torch only when a function
needs it, so that the command line can offer these choices without loading torch.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
Backend = Literal["auto", "flex", "chunked", "dense"]
BACKENDS: tuple[Backend, ...] = ("auto", "flex", "chunked", "dense")
# The environment variable that moves the user's cache folder (published checkpoints, compiled code).
CACHE_ENV = "TRANSCRIPTFORMER_CACHE"
# Environment variables that set torch's CPU threads, as torch reads them: the first one set wins.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else MPS, else CPU; otherwise ``device`` itself.

    Raises
    ------
    ValueError
        When a CUDA device is asked for and this torch build sees none.
    """
    import torch

    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but this torch build sees no CUDA GPU; use `device=cpu`")
    return device


def default_precision(device: torch.device) -> str:
    """``16-mixed`` on CUDA, ``32`` elsewhere."""
    return "16-mixed" if device.type == "cuda" else "32"


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The precision a run uses: ``precision`` itself, or for ``None`` :func:`default_precision`.

    ``precision`` is one of :data:`PRECISIONS`, checked by the settings that hold it. ``16-mixed`` on the CPU runs,
    with a warning: CPUs have no fast float16 arithmetic (the demo model's inference takes 4-5 times as long as with
    ``32`` on a 2-core AMD EPYC). Called once per run, where the precision is applied: by the batch loop (inference
    and the API) and by the trainer (``train``, ``finetune``).
    """
    if precision == "16-mixed" and device.type == "cpu":
        warnings.warn(
            "precision 16-mixed on the CPU is several times slower than 32 (CPUs have no fast float16 arithmetic); "
            "use `precision=32`, or bf16-mixed on a CPU with bfloat16 support",
            stacklevel=1,  # attributed here: one warning however many batch loops a run has
        )
    return precision or default_precision(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for ``16-mixed`` and ``bf16-mixed``; nothing for ``32``."""
    import torch

    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "16-mixed" else torch.bfloat16)


def requested_threads(environ: Mapping[str, str]) -> int | None:
    """The thread count that :data:`THREAD_VARIABLES` in ``environ`` ask for; ``None`` when none is set.

    Raises
    ------
    ValueError
        When the first variable set is not a whole number >= 1 (OpenMP's nested list ``"4,2"`` counts its first).
    """
    for name in THREAD_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            first = value.split(",")[0].strip()
            if not first.isdigit() or int(first) < 1:
                raise ValueError(f"{name}={value!r} is not a thread count: set it to a whole number >= 1, or unset it")
            return int(first)
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: the machine's, within its CPU affinity and its container's CPU quota (cgroups)."""
    import joblib

    return joblib.cpu_count()


# The window over which other processes' CPU use is measured: from the previous sample (the first is taken when this
# module is imported, so a command's own start-up is the window) to now, at least MIN_WINDOW and at most MAX_WINDOW
# seconds (older samples are replaced by a fresh window of MIN_WINDOW). The 1-minute load average, used before, still
# counts a job that ended seconds ago: a command started right after another chose 1 thread on an idle machine.
MIN_WINDOW = 0.2
MAX_WINDOW = 30.0


@dataclass(frozen=True)
class CpuSample:
    """CPU time at one moment: the machine's busy seconds (all CPUs) and this process's own."""

    at: float
    busy: float
    own: float

    @classmethod
    def now(cls) -> CpuSample:
        """The machine's and this process's CPU seconds so far (``psutil``; ``busy`` is 0 where it cannot tell)."""
        import psutil

        times = psutil.cpu_times()
        busy = sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))
        own = os.times()
        return cls(time.perf_counter(), busy, own.user + own.system)


def _first_sample() -> CpuSample | None:
    """The sample that opens the first window: taken at import, so that a command's start-up is measured."""
    try:
        return CpuSample.now()
    except (ImportError, OSError):
        return None


_last_sample = _first_sample()


def _sample_window() -> tuple[CpuSample, CpuSample]:
    """The last sample and a new one at least :data:`MIN_WINDOW` later (a fresh window when the last is too old)."""
    global _last_sample
    first = _last_sample
    if first is None or time.perf_counter() - first.at > MAX_WINDOW:
        first = CpuSample.now()
    wait = MIN_WINDOW - (time.perf_counter() - first.at)
    if wait > 0:
        time.sleep(wait)
    _last_sample = CpuSample.now()
    return first, _last_sample


def idle_cpus() -> float:
    """The machine's CPUs less those that other processes kept busy over the recent past.

    Measured over the window since the previous sample (this module's import, for a command: its start-up), from
    the machine's busy CPU time less this process's own, which is about to run the model and competes with nobody.
    Where the machine's CPU times cannot be read, the 1-minute load average stands in; where neither exists, every
    CPU counts as idle.
    """
    cpus = os.cpu_count() or 1
    try:
        first, last = _sample_window()
    except (ImportError, OSError):
        return cpus - os.getloadavg()[0] if hasattr(os, "getloadavg") else float(cpus)
    others = (last.busy - first.busy) - (last.own - first.own)
    return cpus - max(0.0, others) / (last.at - first.at)


def default_threads(usable: int, idle: float, reserved: int = 0, processes: int = 1) -> int:
    """Threads per process that leave no CPU oversubscribed: the usable CPUs that are idle, shared, less ``reserved``.

    Parameters
    ----------
    usable
        CPUs this process may run on (:func:`usable_cpus`).
    idle
        CPUs the machine leaves idle (:func:`idle_cpus`), rounded to the nearest whole CPU.
    reserved
        CPUs each process keeps for its other busy threads (the inference's data-reading threads).
    processes
        Processes of this run that share the CPUs.
    """
    free = min(usable, math.floor(idle + 0.5))
    return max(1, free // processes - reserved)


def cpu_threads(reserved: int = 0, processes: int = 1, environ: Mapping[str, str] | None = None) -> int:
    """Torch's intra-op threads for a run: what :data:`THREAD_VARIABLES` ask for, else :func:`default_threads`.

    ``environ`` defaults to ``os.environ``. On a busy machine, more threads than idle CPUs make every parallel
    operation wait for a thread that the operating system has paused: many times slower than one thread.
    """
    requested = requested_threads(os.environ if environ is None else environ)
    if requested is not None:
        return requested
    return default_threads(usable_cpus(), idle_cpus(), reserved, processes)


def use_cpu_threads(reserved: int = 0, processes: int = 1) -> int:
    """Set torch's intra-op threads to :func:`cpu_threads` and return the count."""
    import torch

    threads = cpu_threads(reserved, processes)
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Within the block, a run may set torch's CPU threads (:func:`use_cpu_threads`); they are set back after it.

    A command run in a process that goes on (``main(argv)`` from Python) leaves the threads as it found them. Without
    torch imported before the block, there is nothing to keep.
    """
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(threads)


def default_cache_dir() -> Path:
    """``$TRANSCRIPTFORMER_CACHE``, else the platform's user cache folder for ``transcriptformer``."""
    import platformdirs

    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path(platformdirs.user_cache_dir("transcriptformer"))
