"""TranscriptFormer: a generative cross-species single-cell foundation model, exact and fast on CPU and GPU."""

from transcriptformer.api import TranscriptFormerModel, load
from transcriptformer.checkpoint import Checkpoint, load_checkpoint
from transcriptformer.config import DataConfig, LossConfig, ModelConfig, TranscriptFormerConfig

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "TranscriptFormerConfig",
    "TranscriptFormerModel",
    "__version__",
    "load",
    "load_checkpoint",
]
