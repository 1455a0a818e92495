"""``transcriptformer doctor``: find out in seconds why the GPU is not used, and what batch size fits.

:func:`gather_environment` collects the facts (Python, torch build, the ``torch``/``torchvision``/``torchaudio``
versions, what ``nvidia-smi`` and torch see); :func:`diagnose` turns facts into findings, each with a fix when
there is one. Diagnosis is a pure function of the facts, so every situation (a CPU-only torch on a GPU machine,
mismatched torchvision, a driver too old for the torch build) can be checked without that machine.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Literal

import torch

from transcriptformer.config import LossConfig, ModelConfig
from transcriptformer.model.attention import build_attention_inputs, chunked_attend, flex_attend
from transcriptformer.model.transcriptformer import SpecialTokens, TranscriptFormer

Level = Literal["ok", "info", "warning", "problem"]
INSTALL_TORCH = "python scripts/install_torch.py --yes"
TRIO = ("torch", "torchvision", "torchaudio")
# Local version labels that name a build variant (others, such as ``+git1a2b3c4`` of a source build, name a commit).
BUILD_LABEL = re.compile(r"cpu|cu\d{3,}|rocm\d+(\.\d+)*|xpu")
# torchaudio 2.11.1 is one wheel (py3-none, ``torch>=2.11`` in its PyPI metadata) for every torch from 2.11 on; no
# torchaudio 2.12 to 2.14 exists on PyPI.
TORCHAUDIO_ANY_TORCH = (2, 11, 1)


@dataclass(frozen=True)
class Finding:
    """One line of the report.

    Attributes
    ----------
    level : {"ok", "info", "warning", "problem"}
        A ``problem`` makes ``doctor`` exit with code 1.
    message : str
    fix : str or None
        Command or action that resolves it.
    """

    level: Level
    message: str
    fix: str | None = None


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as ``nvidia-smi`` reports it (memory in MiB)."""

    index: int
    name: str
    driver: str
    memory_total_mib: int
    memory_free_mib: int


@dataclass(frozen=True)
class CudaDevice:
    """One CUDA device as torch sees it (memory in bytes)."""

    name: str
    free_bytes: int
    total_bytes: int


@dataclass
class Environment:
    """The facts :func:`diagnose` judges.

    ``versions`` maps ``torch``, ``torchvision`` and ``torchaudio`` to their versions (``None``: not installed);
    ``torch_cuda`` is ``torch.version.cuda``, the CUDA version torch is built for (``None``: not a CUDA build).
    ``cpu_flags`` are the CPU's feature flags as Linux lists them in ``/proc/cpuinfo`` (``None``: unknown).
    """

    python: str
    system: str
    versions: dict[str, str | None]
    torch_cuda: str | None
    cuda_available: bool
    mps_available: bool
    driver_cuda: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    cuda_devices: list[CudaDevice] = field(default_factory=list)
    cpu_flags: frozenset[str] | None = None


@dataclass(frozen=True)
class PublishedModel:
    """Sizes of a published checkpoint (every one has the architecture of :class:`ModelConfig` defaults)."""

    name: str
    vocab_size: int
    esm_width: int = 2560


PUBLISHED_MODELS = (
    PublishedModel("tf-sapiens", 23_829),
    PublishedModel("tf-exemplar", 110_290),
    PublishedModel("tf-metazoa", 247_388),
)

# Inference memory per cell of full length (seq_len + aux positions), in bytes per position: a part proportional
# to the width E, and, when the gene-id head runs (gene_llh output), a part proportional to the vocabulary V (the
# fp32 logits, their softcap and log-softmax). Measured with benchmarks/doctor_memory.py on an H200 under 16-mixed
# autocast (torch 2.11): 22.0 per width; 12.4 (TF-Sapiens) and 13.9 (TF-Metazoa) per vocabulary entry.
BYTES_PER_POSITION_PER_WIDTH = 22.0
BYTES_PER_POSITION_PER_VOCAB = 14.0
# Share of the free memory a suggestion may use, leaving room for the allocator and CUDA context.
MEMORY_HEADROOM = 0.85
# CPU flags (Linux /proc/cpuinfo) of bfloat16 matrix instructions, fastest first, and their names.
CPU_BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}
# When bf16-mixed beats precision 32 on such a CPU (the CLI, fresh processes, mid-size model, 2 threads, quiet
# machine: 1.16x at 16 cells uncompiled, 1.67x at 256 with the compiled bf16 score loop in the cache folder;
# benchmarks/README.md, benchmarks/bf16_cli.py).
BF16_PAYS = (
    "bf16-mixed runs matrix products in bf16, faster than 32 from a few cells on; the attention's score loop is "
    "compiled once per machine, by the first run of more than about 30 cells, and kept in the cache folder"
)


def gather_environment() -> Environment:
    """Collect the facts of this machine."""
    env = Environment(
        python=platform.python_version(),
        system=f"{platform.system()} {platform.machine()}",
        versions=installed_versions(),
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        mps_available=torch.backends.mps.is_available(),
        cpu_flags=cpu_flags(),
    )
    header, table = _nvidia_smi(), _nvidia_smi("--query-gpu=index,name,driver_version,memory.total,memory.free")
    env.driver_cuda = driver_cuda_version(header)
    env.gpus = parse_gpu_table(table)
    if env.cuda_available:
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            env.cuda_devices.append(CudaDevice(torch.cuda.get_device_name(i), free, total))
    return env


def installed_versions() -> dict[str, str | None]:
    """Versions of ``torch``, ``torchvision`` and ``torchaudio`` (``None``: not installed).

    torch's is ``torch.__version__`` of the imported module: it carries the build label (``2.14.1+cu130``) that the
    package metadata of PyPI's wheels lacks (``2.14.1``). The other two are read from package metadata, so that a
    torchvision that fails at import is reported instead of imported.
    """
    return {"torch": str(torch.__version__)} | {name: _installed_version(name) for name in TRIO[1:]}


def split_version(version: str) -> tuple[tuple[int, ...], str | None]:
    """The release numbers and the local label of a version.

    ``2.14.1+cu130`` -> ``((2, 14, 1), "cu130")``, ``2.14.1`` -> ``((2, 14, 1), None)``. Pre-, post- and
    development parts end the release numbers: ``2.15.0.dev20260901+cpu`` -> ``((2, 15, 0), "cpu")``,
    ``3.14.0rc1`` -> ``((3, 14, 0), None)``.
    """
    public, _, label = version.strip().partition("+")
    numbers = []
    for part in public.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() < len(part):
            break
    return tuple(numbers), label or None


def torch_build(version: str | None, torch_cuda: str | None = None) -> str | None:
    """The build variant of a torch, torchvision or torchaudio version: ``cu130``, ``cpu``, ``rocm6.2``, ``xpu``.

    The local label names it when there is one. PyPI's Linux torch wheels have no label in their metadata yet are
    CUDA builds: then ``torch_cuda`` (``torch.version.cuda``) names it. ``None`` when neither does (PyPI's macOS
    wheels; a source build, whose label names a commit).
    """
    label = split_version(version)[1] if version else None
    if label and BUILD_LABEL.fullmatch(label):
        return label
    if torch_cuda:
        return "cu" + "".join(map(str, split_version(torch_cuda)[0][:2]))
    return None


def build_cuda(version: str | None, torch_cuda: str | None = None) -> str | None:
    """The CUDA version a torch is built for: ``torch_cuda``, else read from a ``+cuXYZ`` label (``cu130`` -> 13.0)."""
    build = torch_build(version, torch_cuda)
    if torch_cuda or build is None or not build.startswith("cu"):
        return torch_cuda
    return f"{build[2:-1]}.{build[-1]}"


def driver_cuda_version(nvidia_smi_output: str) -> str | None:
    """The ``CUDA Version: X.Y`` of the ``nvidia-smi`` header: the newest CUDA the driver supports."""
    match = re.search(r"CUDA Version:\s*(\d+\.\d+)", nvidia_smi_output)
    return match.group(1) if match else None


def parse_gpu_table(csv_output: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.free`` CSV output."""
    gpus = []
    for line in csv_output.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 5 and parts[0].isdigit() and parts[3].isdigit() and parts[4].isdigit():
            gpus.append(GpuInfo(int(parts[0]), parts[1], parts[2], int(parts[3]), int(parts[4])))
    return gpus


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags from Linux's ``cpuinfo`` file; ``None`` where there is none (other systems)."""
    try:
        with open(cpuinfo, encoding="utf-8") as file:
            text = file.read()
    except OSError:
        return None
    lines = (line.partition(":")[2] for line in text.splitlines() if line.split(":")[0].strip() == "flags")
    return frozenset(chain.from_iterable(line.split() for line in lines))


def cpu_bf16_finding(flags: frozenset[str] | None) -> Finding:
    """Whether ``--precision bf16-mixed`` can run matrix products in bfloat16 on this CPU."""
    prefix = "CPU bf16 matrix instructions:"
    if flags is None:
        return Finding("info", f"{prefix} unknown on this system; on the CPU, precision 32 is the safe choice")
    found = [name for flag, name in CPU_BF16_FLAGS.items() if flag in flags]
    if found:
        return Finding("info", f"{prefix} {', '.join(found)} ({BF16_PAYS})")
    return Finding("info", f"{prefix} none (bf16-mixed would run slower than 32 here); on the CPU use precision 32")


def diagnose(env: Environment) -> list[Finding]:
    """Judge the facts: Python, the torch build against the hardware, the torch package trio and the CPU."""
    python_ok = split_version(env.python)[0][:2] >= (3, 11)
    findings = [Finding("ok" if python_ok else "problem", f"Python {env.python} on {env.system}")]
    findings += _torch_build_findings(env)
    trio = trio_problems(env.versions, env.torch_cuda)
    findings += [Finding("problem", p, fix=INSTALL_TORCH) for p in trio]
    if not trio:
        installed = ", ".join(f"{name} {v}" for name, v in env.versions.items() if v)
        findings.append(Finding("ok", f"consistent packages: {installed}"))
    findings.append(cpu_bf16_finding(env.cpu_flags))
    return findings


def _torch_build_findings(env: Environment) -> list[Finding]:
    torch_version = env.versions.get("torch")
    cuda = build_cuda(torch_version, env.torch_cuda)
    build = _build_name(torch_version, cuda)
    gpu_names = ", ".join(sorted({g.name for g in env.gpus}))
    if env.cuda_available:
        devices = ", ".join(d.name for d in env.cuda_devices) or "CUDA device"
        return [Finding("ok", f"torch {torch_version} ({build}) uses the GPU: {devices}")]
    if env.gpus and cuda is None:
        return [
            Finding(
                "problem",
                f"torch {torch_version} is a {build} build, but this machine has an NVIDIA GPU ({gpu_names}): "
                "everything runs on the CPU, many times slower",
                fix=INSTALL_TORCH,
            )
        ]
    if env.gpus:
        driver = f"CUDA {env.driver_cuda}" if env.driver_cuda else "an unknown CUDA version"
        if env.driver_cuda and split_version(cuda)[0] > split_version(env.driver_cuda)[0]:
            reason = f"torch is built for CUDA {cuda} but the driver supports only {driver}"
            fix = f"update the NVIDIA driver, or: {INSTALL_TORCH}"
        else:
            reason = f"torch is built for CUDA {cuda}, the driver supports {driver}, yet no GPU is visible"
            fix = "check CUDA_VISIBLE_DEVICES and that the driver is loaded (nvidia-smi)"
        return [Finding("problem", f"torch {torch_version} cannot use the GPU ({gpu_names}): {reason}", fix=fix)]
    if env.mps_available:
        return [Finding("ok", f"torch {torch_version} uses the Apple GPU (MPS)")]
    return [Finding("info", f"torch {torch_version} ({build} build); no GPU found, models run on the CPU")]


def _build_name(torch_version: str | None, cuda: str | None) -> str:
    """``CUDA 13.0``, ``ROCm 6.2``, ``XPU`` or ``CPU-only``."""
    if cuda:
        return f"CUDA {cuda}"
    build = torch_build(torch_version) or "cpu"
    if build.startswith("rocm"):
        return f"ROCm {build[4:]}"
    return "XPU" if build == "xpu" else "CPU-only"


def trio_problems(versions: Mapping[str, str | None], torch_cuda: str | None = None) -> list[str]:
    """Inconsistencies between installed ``torch``, ``torchvision`` and ``torchaudio`` versions.

    torchvision ``0.(m+15)`` belongs to torch ``2.m``; torchaudio ``2.m`` too, and from torch 2.11 on also any
    torchaudio from 2.11.1 (one wheel for every later torch) up to ``2.m``. Build variants must agree where both
    are known (:func:`torch_build`: the local label, ``+cu130``, ``+cpu``, ``+rocm6.2``, or for torch also
    ``torch_cuda``); a version without a label (PyPI's metadata) agrees with any build. Packages that are not
    installed are not a problem (TranscriptFormer needs neither torchvision nor torchaudio).
    """
    torch_version = versions.get("torch")
    if torch_version is None:
        return ["torch is not installed"]
    torch_release, build = split_version(torch_version)[0], torch_build(torch_version, torch_cuda)
    problems = []
    for name in ("torchvision", "torchaudio"):
        version = versions.get(name)
        if version is None:
            continue
        expected = _companion_mismatch(name, split_version(version)[0], torch_release)
        other_build = torch_build(version)
        if expected:
            problems.append(f"{name} {version} does not belong to torch {torch_version} (expected {name} {expected})")
        elif build and other_build and build != other_build:
            problems.append(f"{name} {version} is a {other_build} build but torch {torch_version} a {build} build")
    return problems


def _companion_mismatch(name: str, release: tuple[int, ...], torch_release: tuple[int, ...]) -> str | None:
    """The releases of ``name`` that belong to torch ``torch_release`` when ``release`` is not one, else ``None``."""
    if len(torch_release) < 2 or torch_release[0] != 2:
        return None
    minor = torch_release[1]
    if name == "torchvision":
        return None if release[:2] == (0, minor + 15) else f"0.{minor + 15}.x"
    if release[:2] == (2, minor) or (TORCHAUDIO_ANY_TORCH <= release[:3] and release[:2] <= (2, minor)):
        return None
    return f"2.{minor}.x" if minor < 12 else f"{'.'.join(map(str, TORCHAUDIO_ANY_TORCH))} to 2.{minor}.x"


def check_flex_attention(device: torch.device) -> Finding:
    """Compile FlexAttention with the model's score and mask functions and compare it with the exact path."""
    if device.type != "cuda":
        return Finding("info", f"FlexAttention is compiled on CUDA only; on {device.type} the exact chunked path runs")
    generator = torch.Generator(device=device).manual_seed(0)
    batch, heads, length, head_dim = 2, 4, 200, 32  # a length that is not a multiple of the 128 block
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, generator=generator) for _ in range(3))
    counts = torch.randint(0, 30, (batch, length), device=device, generator=generator).float()
    is_pad = torch.zeros(batch, length, dtype=torch.bool, device=device)
    is_pad[1, 150:] = True
    settings = {"eps": 1e-6, "cap": 10.0, "embed_mode": True}
    start = time.perf_counter()
    try:
        flex = flex_attend(q, k, v, build_attention_inputs(counts, is_pad, **settings, backend="flex"))
        torch.cuda.synchronize(device)
    except Exception as err:  # any compiler or runtime failure is what this check reports
        return Finding(
            "problem",
            f"FlexAttention does not compile here: {type(err).__name__}: {str(err).splitlines()[0][:300]}",
            fix="pass attention_backend='chunked' (exact, slower on GPU), or install a consistent torch: "
            + INSTALL_TORCH,
        )
    seconds = time.perf_counter() - start
    exact = chunked_attend(q, k, v, build_attention_inputs(counts, is_pad, **settings, backend="chunked"))
    error = (flex - exact).abs().max().item()
    level: Level = "ok" if error < 1e-3 else "problem"
    return Finding(level, f"FlexAttention compiles ({seconds:.1f} s) and matches the exact path (max diff {error:.1e})")


@functools.cache
def weight_bytes(model: PublishedModel, bytes_per_value: int = 4) -> int:
    """Bytes of the parameters and buffers of a published model, counted on the meta device (no memory used)."""
    with torch.device("meta"):
        net = TranscriptFormer(
            ModelConfig(),
            LossConfig(),
            gene_table=torch.empty(model.vocab_size, model.esm_width),
            special_tokens=SpecialTokens(pad=1, start=2, end=3),
            aux_vocabs={"assay": {"unknown": 0}},
        )
    return sum(t.numel() for t in chain(net.parameters(), net.buffers())) * bytes_per_value


def bytes_per_cell(model: PublishedModel, gene_llh: bool, config: ModelConfig | None = None) -> int:
    """Inference activation memory of one full-length cell (see the constants above)."""
    config = config or ModelConfig()
    positions = config.seq_len + config.aux_len
    per_position = BYTES_PER_POSITION_PER_WIDTH * config.embed_dim
    if gene_llh:
        per_position += BYTES_PER_POSITION_PER_VOCAB * model.vocab_size
    return int(positions * per_position)


def suggested_batch_size(free_bytes: int, model: PublishedModel, gene_llh: bool) -> int:
    """Largest batch of full-length cells that fits in ``free_bytes`` with the model loaded (0: does not fit)."""
    available = free_bytes * MEMORY_HEADROOM - weight_bytes(model)
    return max(0, math.floor(available / bytes_per_cell(model, gene_llh)))


def memory_findings(devices: list[CudaDevice]) -> list[Finding]:
    """Free memory of each CUDA device and the batch size that fits for each published model."""
    findings = []
    for index, device in enumerate(devices):
        gib = 1 << 30
        lines = [
            f"cuda:{index} {device.name}: {device.free_bytes / gib:.1f} of {device.total_bytes / gib:.1f} GiB free"
        ]
        for model in PUBLISHED_MODELS:
            embed, full = (suggested_batch_size(device.free_bytes, model, g) for g in (False, True))
            weights = weight_bytes(model) / gib
            if embed == 0:
                lines.append(f"  {model.name}: does not fit ({weights:.1f} GiB of weights)")
            else:
                lines.append(f"  {model.name}: batch size {embed} for embeddings, {full} with gene_llh")
        findings.append(Finding("info", "\n".join(lines)))
    return findings


def run_doctor(check_flex: bool = True) -> tuple[list[Finding], int]:
    """All checks of this machine; the exit code is 1 when any finding is a problem."""
    env = gather_environment()
    findings = diagnose(env)
    if check_flex:
        findings.append(check_flex_attention(torch.device("cuda" if env.cuda_available else "cpu")))
    findings += memory_findings(env.cuda_devices)
    return findings, int(any(f.level == "problem" for f in findings))


def format_findings(findings: list[Finding]) -> str:
    """The report, one finding per line (continuation lines indented), fixes after an arrow."""
    marks = {"ok": "[ok]  ", "info": "[info]", "warning": "[warn]", "problem": "[FAIL]"}
    lines = []
    for finding in findings:
        first, *rest = finding.message.splitlines()
        lines.append(f"{marks[finding.level]} {first}")
        lines += [f"       {line}" for line in rest]
        if finding.fix:
            lines.append(f"       -> fix: {finding.fix}")
    return "\n".join(lines)


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi(*args: str) -> str:
    """Output of ``nvidia-smi`` (with ``--format=csv,noheader,nounits`` for queries); empty without a driver."""
    if shutil.which("nvidia-smi") is None:
        return ""
    command = ["nvidia-smi", *args, *(["--format=csv,noheader,nounits"] if args else [])]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
