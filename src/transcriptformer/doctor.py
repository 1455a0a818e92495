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
    """The facts :func:`diagnose` judges."""

    python: str
    system: str
    versions: dict[str, str | None]
    torch_cuda: str | None
    cuda_available: bool
    mps_available: bool
    driver_cuda: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    cuda_devices: list[CudaDevice] = field(default_factory=list)


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


def gather_environment() -> Environment:
    """Collect the facts of this machine."""
    env = Environment(
        python=platform.python_version(),
        system=f"{platform.system()} {platform.machine()}",
        versions={name: _installed_version(name) for name in TRIO},
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        mps_available=torch.backends.mps.is_available(),
    )
    header, table = _nvidia_smi(), _nvidia_smi("--query-gpu=index,name,driver_version,memory.total,memory.free")
    env.driver_cuda = driver_cuda_version(header)
    env.gpus = parse_gpu_table(table)
    if env.cuda_available:
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            env.cuda_devices.append(CudaDevice(torch.cuda.get_device_name(i), free, total))
    return env


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


def diagnose(env: Environment) -> list[Finding]:
    """Judge the facts: Python, the torch build against the hardware, and the torch package trio."""
    python_ok = _version_key(env.python)[:2] >= (3, 11)
    findings = [Finding("ok" if python_ok else "problem", f"Python {env.python} on {env.system}")]
    findings += _torch_build_findings(env)
    trio = trio_problems(env.versions)
    findings += [Finding("problem", p, fix=INSTALL_TORCH) for p in trio]
    if not trio:
        installed = ", ".join(f"{name} {v}" for name, v in env.versions.items() if v)
        findings.append(Finding("ok", f"consistent packages: {installed}"))
    return findings


def _torch_build_findings(env: Environment) -> list[Finding]:
    torch_version = env.versions.get("torch")
    gpu_names = ", ".join(sorted({g.name for g in env.gpus}))
    if env.cuda_available:
        devices = ", ".join(d.name for d in env.cuda_devices) or "CUDA device"
        return [Finding("ok", f"torch {torch_version} (CUDA {env.torch_cuda}) uses the GPU: {devices}")]
    if env.gpus and env.torch_cuda is None:
        return [
            Finding(
                "problem",
                f"torch {torch_version} is a CPU-only build, but this machine has an NVIDIA GPU ({gpu_names}): "
                "everything runs on the CPU, many times slower",
                fix=INSTALL_TORCH,
            )
        ]
    if env.gpus:
        driver = f"CUDA {env.driver_cuda}" if env.driver_cuda else "an unknown CUDA version"
        if env.driver_cuda and _version_key(env.torch_cuda) > _version_key(env.driver_cuda):
            reason = f"torch is built for CUDA {env.torch_cuda} but the driver supports only {driver}"
            fix = f"update the NVIDIA driver, or: {INSTALL_TORCH}"
        else:
            reason = f"torch is built for CUDA {env.torch_cuda}, the driver supports {driver}, yet no GPU is visible"
            fix = "check CUDA_VISIBLE_DEVICES and that the driver is loaded (nvidia-smi)"
        return [Finding("problem", f"torch {torch_version} cannot use the GPU ({gpu_names}): {reason}", fix=fix)]
    if env.mps_available:
        return [Finding("ok", f"torch {torch_version} uses the Apple GPU (MPS)")]
    build = f"CUDA {env.torch_cuda} build" if env.torch_cuda else "CPU-only build"
    return [Finding("info", f"torch {torch_version} ({build}); no GPU found, models run on the CPU")]


def trio_problems(versions: Mapping[str, str | None]) -> list[str]:
    """Inconsistencies between installed ``torch``, ``torchvision`` and ``torchaudio`` versions.

    torchvision ``0.(m+15)`` and torchaudio ``2.m`` belong to torch ``2.m``; local build labels (``+cu121``,
    ``+cpu``) must agree when both packages carry one. Packages that are not installed are not a problem
    (TranscriptFormer needs neither torchvision nor torchaudio).
    """
    torch_version = versions.get("torch")
    if torch_version is None:
        return ["torch is not installed"]
    (major, minor), label = _release(torch_version)
    expected = {"torchvision": (0, minor + 15) if major == 2 else None, "torchaudio": (major, minor)}
    problems = []
    for name in ("torchvision", "torchaudio"):
        version = versions.get(name)
        if version is None:
            continue
        release, other_label = _release(version)
        if expected[name] is not None and release != expected[name]:
            want = ".".join(map(str, expected[name]))
            problems.append(f"{name} {version} does not belong to torch {torch_version} (expected {name} {want}.x)")
        elif label and other_label and label != other_label:
            problems.append(f"{name} {version} is a {other_label} build but torch {torch_version} a {label} build")
    return problems


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


def _release(version: str) -> tuple[tuple[int, int], str | None]:
    """``2.5.1+cu121`` -> ``((2, 5), "cu121")``."""
    public, _, label = version.partition("+")
    major, minor = (int(re.match(r"\d+", part).group()) for part in public.split(".")[:2])
    return (major, minor), label or None


def _version_key(version: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")) if version else ()
