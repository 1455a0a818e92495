"""Downloads: published checkpoints (:mod:`.artifacts`) and CELLxGENE Discover datasets (:mod:`.cellxgene`)."""

from transcriptformer.hub.artifacts import ARTIFACTS, ArchiveError, Artifact, download_artifact, resolve_artifacts
from transcriptformer.hub.http import ChecksumError, DownloadError, RetryPolicy, download_file

__all__ = [
    "ARTIFACTS",
    "ArchiveError",
    "Artifact",
    "ChecksumError",
    "DownloadError",
    "RetryPolicy",
    "download_artifact",
    "download_file",
    "resolve_artifacts",
]
