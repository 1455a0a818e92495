r"""The local cache of published checkpoints: ``transcriptformer.load("tf-sapiens")`` downloads once, then reuses.

The cache is a folder laid out like the one ``transcriptformer download --checkpoint-dir`` fills:
``<cache>/tf_sapiens/`` with its completion marker (see :mod:`transcriptformer.hub.artifacts`, which does the
resumable, verified download). A folder counts only when the marker is there, so a half-finished download is
resumed, never loaded. A lock file per checkpoint keeps two processes that share the cache from downloading
the same archive at once; the second waits and then finds the first one's download.

Where the cache lives: ``cache_dir``, else ``$TRANSCRIPTFORMER_CACHE``, else the user cache folder of the
platform (through ``platformdirs``): ``~/.cache/transcriptformer`` on Linux (``$XDG_CACHE_HOME`` respected),
``~/Library/Caches/transcriptformer`` on macOS, ``%LOCALAPPDATA%\transcriptformer\Cache`` on Windows.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from filelock import FileLock

from transcriptformer.errors import UserError
from transcriptformer.hub.artifacts import ARTIFACTS, Artifact, download_artifact, is_complete
from transcriptformer.runtime import CACHE_ENV as CACHE_ENV
from transcriptformer.runtime import default_cache_dir

LOCKS_DIR = ".locks"
MODELS: tuple[str, ...] = tuple(name for name, artifact in ARTIFACTS.items() if artifact.is_model)


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """Neither a checkpoint folder nor the name of a published model."""


def resolve_checkpoint(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The checkpoint folder behind a path or a published model name: the one resolver of every command and the API.

    Parameters
    ----------
    name_or_path
        An existing folder (taken as it is), or one of :data:`MODELS` (``tf-sapiens``, ``tf-exemplar``,
        ``tf-metazoa``), downloaded into the cache on first use and read from it, offline, afterwards.
    cache_dir
        The cache folder; :func:`default_cache_dir` when omitted.

    Raises
    ------
    CheckpointNotFoundError
        Neither a folder nor a published model; the one-line message lists the names and the download command.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name not in MODELS:
        raise CheckpointNotFoundError(not_found_message(name))
    return cached_checkpoint(ARTIFACTS[name], cache_dir)


def not_found_message(name: str) -> str:
    """What a name that is neither a folder nor a published model is told (one line)."""
    close = difflib.get_close_matches(name, MODELS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (
        f"{name!r}: no such checkpoint folder, and not a published model; {hint}published models: "
        f"{', '.join(MODELS)} (downloaded into the cache on first use, or ahead of time with "
        "`transcriptformer download NAME`)"
    )


def cached_checkpoint(artifact: Artifact, cache_dir: str | Path | None = None) -> Path:
    """``<cache_dir>/<artifact.directory>``, downloaded first unless the cache holds a finished download."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache_dir / artifact.directory
    if is_complete(target):  # the common case: no lock, no network
        return target
    lock = cache_dir / LOCKS_DIR / f"{artifact.directory}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock):
        return download_artifact(artifact, cache_dir)
