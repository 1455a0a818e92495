"""Where and how the model runs: the device and the numeric precision.

This module is at the bottom of the package (it imports nothing of it) and imports torch only when a function
needs it, so that the command line can offer these choices without loading torch.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
Backend = Literal["auto", "flex", "chunked", "dense"]
BACKENDS: tuple[Backend, ...] = ("auto", "flex", "chunked", "dense")


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
        raise ValueError("device 'cuda' was asked for, but this torch build sees no CUDA GPU; use --device cpu")
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
            "use --precision 32, or bf16-mixed on a CPU with bfloat16 support",
            stacklevel=1,  # attributed here: one warning however many batch loops a run has
        )
    return precision or default_precision(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for ``16-mixed`` and ``bf16-mixed``; nothing for ``32``."""
    import torch

    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "16-mixed" else torch.bfloat16)
