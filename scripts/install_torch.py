#!/usr/bin/env python3
"""Install a matching torch / torchvision / torchaudio trio built for this machine's GPU (or for CPU).

A CPU-only torch on a GPU machine runs, silently, on the CPU (one user measured 49 minutes per fine-tuning
iteration that way); a torchvision or torchaudio from another release line breaks at import. This script picks
one release line, the CUDA build that the NVIDIA driver can run, and the PyTorch wheel index that serves it, and
pins all three packages to exact versions of that build::

    python scripts/install_torch.py                 # detect CUDA with nvidia-smi (none: CPU wheels), print the command
    python scripts/install_torch.py --yes           # ... and run it
    python scripts/install_torch.py --cuda 12.1     # the CUDA version nvidia-smi reports on the target machine
    python scripts/install_torch.py --cpu --yes     # CPU-only wheels
    python scripts/install_torch.py --torch 2.6     # a specific release line

It uses the standard library only, so it runs before torch (or this package) is installed. It refuses requests
that cannot be satisfied consistently, e.g. ``--torch 2.9 --cuda 12.1`` (torch 2.9 has no build for CUDA 12.1).
A plan that installs an older version than the one installed says so, and ``--yes`` runs it only with
``--allow-downgrade``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

INDEX_URL = "https://download.pytorch.org/whl"
PACKAGES = ("torch", "torchvision", "torchaudio")


@dataclass(frozen=True)
class Release:
    """One PyTorch release line: matching package versions and the CUDA versions it has wheels for."""

    torch: str
    torchvision: str
    torchaudio: str
    cuda: tuple[str, ...]
    any_build: tuple[str, ...] = ()
    """Packages whose one wheel serves every build (pinned without a ``+cpu``/``+cu130`` label)."""

    @property
    def line(self) -> str:
        """Major.minor of torch, e.g. ``2.9``."""
        return ".".join(self.torch.split(".")[:2])


# Newest first. Wheels on download.pytorch.org/whl/<variant> for Linux and Windows (x86-64): the CPU build
# (whl/cpu) and each CUDA build in `cuda` (whl/cu126, whl/cu130, ...). download.pytorch.org could not be reached
# when lines 2.10 to 2.14 were added, so their facts come from:
# - versions and pairing: PyPI (`pip index versions torch torchvision torchaudio`; the metadata of each
#   torchvision pins its torch, e.g. 0.29.1 requires torch>=2.14.0, 0.28.0 torch==2.13.0). There is no torchaudio
#   2.12 to 2.14: torchaudio 2.11.1 is one py3-none wheel for every torch from 2.11 on (requires torch>=2.11), so
#   those lines pin it without a build label;
# - CUDA builds: the "Release Compatibility Matrix" of pytorch/pytorch RELEASE.md (stable plus experimental CUDA
#   of each line, read from a copy of that file), consistent with PyPI's Linux torch wheels, whose CUDA libraries
#   are 12.8 for 2.10 and 13.0 for 2.11 to 2.14, with the cuDNN versions the matrix names.
# PyPI's torch 2.15.0 has no torchvision yet, so 2.15 is not listed.
RELEASES = (
    Release("2.14.1", "0.29.1", "2.11.1", ("12.6", "13.0", "13.2"), any_build=("torchaudio",)),
    Release("2.13.0", "0.28.0", "2.11.1", ("12.6", "13.0", "13.2"), any_build=("torchaudio",)),
    Release("2.12.1", "0.27.1", "2.11.1", ("12.6", "13.0", "13.2"), any_build=("torchaudio",)),
    Release("2.11.0", "0.26.0", "2.11.0", ("12.6", "12.8", "13.0")),
    Release("2.10.0", "0.25.0", "2.10.0", ("12.6", "12.8", "13.0")),
    Release("2.9.1", "0.24.1", "2.9.1", ("12.6", "12.8", "13.0")),
    Release("2.8.0", "0.23.0", "2.8.0", ("12.6", "12.8", "12.9")),
    Release("2.7.1", "0.22.1", "2.7.1", ("11.8", "12.6", "12.8")),
    Release("2.6.0", "0.21.0", "2.6.0", ("11.8", "12.4", "12.6")),
    Release("2.5.1", "0.20.1", "2.5.1", ("11.8", "12.1", "12.4")),
)


class InconsistentRequest(ValueError):
    """The requested combination has no matching set of wheels."""


@dataclass(frozen=True)
class Plan:
    """What to install: a release line and a build variant (``cu128``, ``cpu``, or ``pypi`` on macOS)."""

    release: Release
    variant: str

    def versions(self) -> dict[str, str]:
        """Exact versions of the three packages.

        The local label (``+cu128``) makes pip replace a build of the same version (``2.9.1+cpu``) instead of
        keeping it as already satisfied.
        """
        r = self.release
        versions = {"torch": r.torch, "torchvision": r.torchvision, "torchaudio": r.torchaudio}
        if self.variant == "pypi":
            return versions
        return {name: v if name in r.any_build else f"{v}+{self.variant}" for name, v in versions.items()}

    def requirements(self) -> list[str]:
        """Exact pins, ``torch==2.14.1+cu130`` and so on."""
        return [f"{name}=={version}" for name, version in self.versions().items()]

    def command(self, python: str = sys.executable) -> list[str]:
        """The pip command line."""
        index = [] if self.variant == "pypi" else ["--index-url", f"{INDEX_URL}/{self.variant}"]
        return [python, "-m", "pip", "install", *self.requirements(), *index]

    def describe(self) -> str:
        """One line for humans."""
        r = self.release
        build = {"cpu": "CPU-only", "pypi": "macOS (CPU and MPS)"}.get(self.variant)
        build = build or f"CUDA {self.variant[2:-1]}.{self.variant[-1]}"
        return f"torch {r.torch} + torchvision {r.torchvision} + torchaudio {r.torchaudio}, {build} wheels"


def parse_cuda_version(nvidia_smi_output: str) -> str | None:
    """The ``CUDA Version: X.Y`` that the header of ``nvidia-smi`` reports (the newest CUDA the driver runs)."""
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", nvidia_smi_output)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def detect_cuda() -> str | None:
    """The driver's CUDA version from ``nvidia-smi``, or ``None`` without a working NVIDIA driver."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_cuda_version(result.stdout)


def cuda_variant(version: str) -> str:
    """``12.8`` -> ``cu128``."""
    major, minor = version.split(".")
    return f"cu{major}{minor}"


def version_key(version: str) -> tuple[int, ...]:
    """The release numbers of a version: ``12.10`` sorts after ``12.9``; ``2.14.1+cu130`` -> ``(2, 14, 1)``.

    Local labels and pre-, post- or development parts are left out (``2.15.0.dev20260901+cpu`` -> ``(2, 15, 0)``).
    """
    numbers = []
    for part in version.partition("+")[0].split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() < len(part):
            break
    return tuple(numbers)


def find_release(line: str) -> Release:
    """The release of a line (``2.6`` or ``2.6.0``)."""
    for release in RELEASES:
        if line in (release.line, release.torch):
            return release
    known = ", ".join(r.line for r in RELEASES)
    raise InconsistentRequest(f"torch {line} is not a release line this script knows (known: {known})")


def usable_cuda(release: Release, driver_cuda: str) -> list[str]:
    """CUDA builds of ``release`` that a driver supporting ``driver_cuda`` can run, oldest first."""
    return [c for c in release.cuda if version_key(c) <= version_key(driver_cuda)]


def choose_cuda_release(driver_cuda: str) -> tuple[Release, str]:
    """The newest release with a build for the driver's CUDA major version (else any build it can run).

    Within that release, the newest CUDA build the driver runs.
    """
    driver_major = version_key(driver_cuda)[0]
    runnable = [(r, usable_cuda(r, driver_cuda)) for r in RELEASES]
    runnable = [(r, builds[-1]) for r, builds in runnable if builds]
    if not runnable:
        oldest = min((c for r in RELEASES for c in r.cuda), key=version_key)
        raise InconsistentRequest(
            f"the driver supports CUDA {driver_cuda}, older than every build (oldest: CUDA {oldest}); "
            "update the NVIDIA driver, or pass --cpu"
        )
    same_major = [(r, c) for r, c in runnable if version_key(c)[0] == driver_major]
    return (same_major or runnable)[0]


def make_plan(cuda: str | None, cpu: bool, torch_line: str | None, system: str) -> Plan:
    """Decide what to install.

    Parameters
    ----------
    cuda
        CUDA version the driver supports (``nvidia-smi``), or ``None`` when there is no NVIDIA GPU: then CPU-only
        wheels.
    cpu
        Install CPU-only wheels.
    torch_line
        Release line (``2.6``), or ``None`` for the newest that fits.
    system
        ``platform.system()``: ``Linux``, ``Windows`` or ``Darwin``.

    Raises
    ------
    InconsistentRequest
        When no set of wheels satisfies the request.
    """
    if cpu and cuda:
        raise InconsistentRequest("--cpu and --cuda contradict each other")
    if system == "Darwin":
        if cuda:
            raise InconsistentRequest("there are no CUDA builds for macOS; the default wheels use the GPU through MPS")
        return Plan(find_release(torch_line) if torch_line else RELEASES[0], "pypi")
    if cpu or cuda is None:
        return Plan(find_release(torch_line) if torch_line else RELEASES[0], "cpu")
    if torch_line is None:
        release, build = choose_cuda_release(cuda)
        return Plan(release, cuda_variant(build))
    release = find_release(torch_line)
    builds = usable_cuda(release, cuda)
    if not builds:
        fitting = [r.line for r in RELEASES if usable_cuda(r, cuda)]
        hint = f"torch {', '.join(fitting)} would" if fitting else "no known release would; update the NVIDIA driver"
        raise InconsistentRequest(
            f"torch {release.line} has builds for CUDA {', '.join(release.cuda)}; none runs on a driver that "
            f"supports CUDA {cuda} ({hint})"
        )
    return Plan(release, cuda_variant(builds[-1]))


def installed_versions(python: str) -> dict[str, str]:
    """Versions of torch, torchvision and torchaudio installed for ``python``, from package metadata.

    Packages that are not installed are left out; so is everything when ``python`` cannot be asked.
    """
    query = (
        "import importlib.metadata as m, json\n"
        "def version(name):\n"
        "    try:\n"
        "        return m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        f"print(json.dumps({{name: version(name) for name in {PACKAGES!r}}}))"
    )
    try:
        result = subprocess.run([python, "-c", query], capture_output=True, text=True, timeout=60, check=False)
        versions = json.loads(result.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return {}
    if not isinstance(versions, dict):
        return {}
    return {name: v for name, v in versions.items() if name in PACKAGES and isinstance(v, str)}


def downgrades(plan: Plan, installed: Mapping[str, str]) -> list[str]:
    """One message for each package that ``plan`` would lower, e.g. ``this is a downgrade from torch 2.15.0 to ...``.

    Only release numbers count: replacing ``2.14.1`` (PyPI's CUDA build) by ``2.14.1+cpu`` is no downgrade.
    """
    messages = []
    for name, version in plan.versions().items():
        current = installed.get(name)
        if current and version_key(current) > version_key(version):
            messages.append(f"this is a downgrade from {name} {current} to {name} {version}")
    return messages


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Install a consistent torch/torchvision/torchaudio trio for this machine's GPU or CPU.",
        epilog="Without --yes the command is only printed.",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--cuda", help="CUDA version the driver supports, X.Y (default: read from nvidia-smi; none found: --cpu)"
    )
    target.add_argument("--cpu", action="store_true", help="install CPU-only wheels")
    parser.add_argument("--torch", help=f"release line, one of {', '.join(r.line for r in RELEASES)} (default: newest)")
    parser.add_argument("--python", default=sys.executable, help="interpreter to install into (this one)")
    parser.add_argument("--yes", action="store_true", help="run the command (default: print it only)")
    parser.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="let --yes install versions older than the installed ones",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print the install command; run it with ``--yes``.

    Exit code 2 for an impossible request, and for ``--yes`` on a downgrade without ``--allow-downgrade``.
    """
    args = build_parser().parse_args(argv)
    if args.cuda is not None and not re.fullmatch(r"\d+\.\d+", args.cuda):
        print(f"error: --cuda takes a version like 12.1, got {args.cuda!r}", file=sys.stderr)
        return 2
    cuda = args.cuda if args.cuda or args.cpu else detect_cuda()
    try:
        plan = make_plan(cuda, args.cpu, args.torch, platform.system())
    except InconsistentRequest as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cuda and not args.cuda:
        print(f"nvidia-smi: the driver supports CUDA {cuda}")
    elif plan.variant == "cpu" and not args.cpu:
        print(
            "no NVIDIA driver found (nvidia-smi is missing or failing): CPU-only wheels; for a GPU machine pass "
            "--cuda X.Y, the CUDA Version its nvidia-smi shows"
        )
    command = plan.command(args.python)
    print(f"{plan.describe()}\n  {shlex.join(command)}")
    installed = installed_versions(args.python)
    lowered = downgrades(plan, installed)
    for message in lowered:
        print(f"warning: {message}")
    if version_key(installed.get("torch", "0")) > version_key(RELEASES[0].torch):
        print(f"  (torch {RELEASES[0].line} is the newest release line this script knows)")
    if not args.yes:
        print("(not run; add --yes to install" + (" and --allow-downgrade to downgrade)" if lowered else ")"))
        return 0
    if lowered and not args.allow_downgrade:
        print("error: not run: this is a downgrade; add --allow-downgrade to run it", file=sys.stderr)
        return 2
    returncode = subprocess.run(command, check=False).returncode
    if returncode == 0:
        check = (
            "import torch; print('installed torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"
        )
        subprocess.run([args.python, "-c", check], check=False)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
