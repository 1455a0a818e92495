"""Where and how the model runs: the device and the numeric precision.

This module is at the bottom of the package (it imports nothing of it) and imports torch only when a function
needs it, so that the command line can offer these choices without loading torch.
"""

from __future__ import annotations

import contextlib
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


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The precision to run at: ``precision`` itself, or for ``None`` ``16-mixed`` on CUDA and ``32`` elsewhere.

    ``precision`` is one of :data:`PRECISIONS`, checked by the settings that hold it.
    """
    return precision or ("16-mixed" if device.type == "cuda" else "32")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for ``16-mixed`` and ``bf16-mixed``; nothing for ``32``."""
    import torch

    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "16-mixed" else torch.bfloat16)
