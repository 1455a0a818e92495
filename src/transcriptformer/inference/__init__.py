"""Batch inference over cell files: settings, the runner, the output layout and multi-process runs.

>>> from transcriptformer.inference import RunConfig, run_inference

The names below are imported on first use, so that reading the settings does not load torch.
"""

import importlib

_EXPORTS = {
    "InferenceConfig": "transcriptformer.inference.config",
    "RunConfig": "transcriptformer.inference.config",
    "apply_overrides": "transcriptformer.inference.config",
    "contextual_embeddings": "transcriptformer.inference.output",
    "run_inference": "transcriptformer.inference.runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
