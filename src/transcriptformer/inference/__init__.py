"""Batch inference over ``.h5ad`` files: settings, the runner, the output layout and multi-process runs.

>>> from transcriptformer.inference import RunConfig, run_inference
"""

from transcriptformer.inference.config import InferenceConfig, RunConfig, apply_overrides
from transcriptformer.inference.output import contextual_embeddings
from transcriptformer.inference.runner import run_inference

__all__ = ["InferenceConfig", "RunConfig", "apply_overrides", "contextual_embeddings", "run_inference"]
