"""Functions compiled once per machine and kept in the user's cache folder (AOTInductor packages).

``torch.compile`` traces a function again in every process (seconds of CPU) even when inductor's own cache holds
the generated code. A function exported by :func:`torch.export.export` with dynamic sizes and compiled by
AOTInductor is instead a package holding a shared library, which a later process loads in milliseconds.

A package is ``<cache>/compiled/<name>-<key>.pt2`` (``<cache>``: :func:`transcriptformer.runtime.default_cache_dir`),
where the key hashes what the code depends on: the torch version, the CPU (its instruction-set flags), the source
of the function and its constant settings. It is written to a temporary file and renamed into place, so a reader
never sees half a package and processes that build the same one at once each write a whole one. Whatever fails (no
C++ compiler, a compile error, an unreadable or corrupt package) warns once and returns ``None``: the caller then
runs its function eagerly.
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from transcriptformer.runtime import default_cache_dir

PACKAGE_DIR = "compiled"
_warned: set[str] = set()


def package_path(name: str, settings: Sequence[object], cache_dir: str | Path | None = None) -> Path:
    """Where the package of ``name`` compiled with ``settings`` (source hashes, constants) lives."""
    parts = [torch.__version__, platform.machine(), cpu_flags(), *map(str, settings)]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / PACKAGE_DIR / f"{name}-{key}.pt2"


def cpu_flags() -> str:
    """The CPU's instruction-set flags (Linux), else the capability torch detected: what compiled code may use."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line for line in cpuinfo if line.startswith("flags")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return torch.backends.cpu.get_cpu_capability()


class Package:
    """A compiled function of tensors to one tensor, loaded from its package.

    Loaded by AOTInductor's runtime loader itself: ``torch._inductor.aoti_load_package`` would first import
    inductor and dynamo and probe the CPU's instruction sets (seconds), which the package's key already covers.
    """

    def __init__(self, path: Path):
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)

    def __call__(self, *inputs: Tensor) -> Tensor:
        """The function's output for ``inputs`` (in the order of the exported signature)."""
        return self.loader.boxed_run(list(inputs))[0]


def load_package(path: Path) -> Package | None:
    """The compiled function in ``path``; ``None`` when there is none or it cannot be loaded (warned once)."""
    if not path.is_file():
        return None
    try:
        return Package(path)
    except Exception as error:  # a corrupt or foreign file: any error of the loader
        warn_once(str(path), f"{path} cannot be loaded ({type(error).__name__}: {error})")
        return None


def build_package(
    module: nn.Module, example_inputs: tuple[Tensor, ...], dynamic_shapes: Sequence[object], path: Path
) -> Package | None:
    """Export ``module`` with ``dynamic_shapes``, compile it into ``path`` and load it; ``None`` on failure (warned).

    ``example_inputs`` fix the dtypes and the layout; every size named in ``dynamic_shapes`` may differ later.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # compiled code: the owner's alone
    fd, partial = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        with torch.inference_mode(False), torch.autocast("cpu", enabled=False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own deprecation notices while exporting
            program = torch.export.export(module, example_inputs, dynamic_shapes=tuple(dynamic_shapes))
            torch._inductor.aoti_compile_and_package(program, package_path=partial)
        os.replace(partial, path)
    except Exception as error:  # no C++ compiler, a failed build, a full disk: the caller runs eagerly
        warn_once(str(path), f"{path} could not be compiled ({type(error).__name__}: {error})")
        return None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return load_package(path)


def warn_once(topic: str, message: str) -> None:
    """Warn about ``topic`` once per process."""
    if topic not in _warned:
        _warned.add(topic)
        warnings.warn(f"{message}; running uncompiled, slower", stacklevel=3)
