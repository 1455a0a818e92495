"""Downloads: published checkpoints (:mod:`.artifacts`) and their cache (:mod:`.cache`), CELLxGENE datasets."""

from transcriptformer.hub.artifacts import ARTIFACTS, ArchiveError, Artifact, download_artifact, resolve_artifacts
from transcriptformer.hub.cache import MODELS, default_cache_dir, resolve_checkpoint
from transcriptformer.hub.http import ChecksumError, DownloadError, RetryPolicy, download_file

__all__ = [
    "ARTIFACTS",
    "MODELS",
    "ArchiveError",
    "Artifact",
    "ChecksumError",
    "DownloadError",
    "RetryPolicy",
    "default_cache_dir",
    "download_artifact",
    "download_file",
    "resolve_artifacts",
    "resolve_checkpoint",
]
