"""TranscriptFormer: a generative cross-species single-cell foundation model, exact and fast on CPU and GPU.

The names below are imported on first use, so that ``import transcriptformer`` (and the command line's start)
does not load torch.
"""

import importlib

from transcriptformer.version import __version__ as __version__

_EXPORTS = {
    "TranscriptFormerModel": "transcriptformer.api",
    "annotate": "transcriptformer.annotation",
    "load": "transcriptformer.api",
    "Checkpoint": "transcriptformer.checkpoint",
    "load_checkpoint": "transcriptformer.checkpoint",
    "DataConfig": "transcriptformer.config",
    "LossConfig": "transcriptformer.config",
    "ModelConfig": "transcriptformer.config",
    "PredictConfig": "transcriptformer.config",
    "TranscriptFormerConfig": "transcriptformer.config",
}
__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
