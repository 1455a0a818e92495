"""The published TranscriptFormer checkpoints: where they live, how to fetch and unpack them safely.

Each artifact is a ``<directory>.tar.gz`` archive on the project's public bucket holding one top-level folder,
e.g. ``tf_sapiens/`` with ``config.json``, ``model_weights.pt`` and ``vocabs/``. :func:`download_artifact`
downloads it (resumable, see :mod:`transcriptformer.hub.http`), extracts it into a hidden staging folder next
to the target with the ``tarfile`` ``data`` filter made stricter (no absolute paths, no ``..``, no links of any
kind, no device files, at most ``max_expansion`` times the archive's size unpacked), checks that the folder holds
a checkpoint (``config.json``, ``model_weights.pt``, ``vocabs/``), writes a completion marker into it and only
then moves it to ``<checkpoint_dir>/<directory>``. A folder without the marker is never taken for a finished
download.

The base URL can be changed with ``TRANSCRIPTFORMER_ARTIFACTS_URL`` (or ``base_url``), e.g. for a mirror.
"""

from __future__ import annotations

import itertools
import json
import logging
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from transcriptformer.config import CONFIG_FILE, VOCAB_DIR, WEIGHTS_FILE
from transcriptformer.errors import UserError
from transcriptformer.hub.http import CHUNK_SIZE, DownloadResult, RetryPolicy, download_file

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://czi-transcriptformer.s3.amazonaws.com/weights"
BASE_URL_ENV = "TRANSCRIPTFORMER_ARTIFACTS_URL"
COMPLETION_MARKER = ".transcriptformer-download.json"
DOWNLOADS_DIR = ".downloads"
# The unpacked files (and their tar headers) may total at most this many times the archive's size: the published
# archives hold weights and embedding tables, which gzip hardly shrinks; a decompression bomb grows far more.
MAX_EXPANSION = 10.0
# A small archive may always unpack to 1 MiB: tar headers and padding weigh 512 bytes each.
MIN_UNPACKED_BYTES = 1 << 20
# What an extracted checkpoint holds (a trailing "/" marks a folder).
CHECKPOINT_LAYOUT = (CONFIG_FILE, WEIGHTS_FILE, f"{VOCAB_DIR}/")


class ArchiveError(UserError, RuntimeError):
    """An archive is corrupt, unsafe to extract, or not laid out as expected."""


@dataclass(frozen=True)
class Artifact:
    """One published archive.

    Attributes
    ----------
    name : str
        Name on the command line, e.g. ``tf-sapiens``.
    directory : str
        Top-level folder of the archive and name of the extracted folder, e.g. ``tf_sapiens``.
    sha256 : str or None
        Published SHA-256 of the archive, when known.
    is_model : bool
        Whether the archive is a checkpoint (``transcriptformer.load`` accepts its name).
    """

    name: str
    directory: str
    sha256: str | None = None
    is_model: bool = True

    @property
    def archive(self) -> str:
        """File name of the archive."""
        return f"{self.directory}.tar.gz"

    @property
    def layout(self) -> tuple[str, ...]:
        """What the extracted folder must hold: the files and folders (``/``) of a checkpoint, for a model."""
        return CHECKPOINT_LAYOUT if self.is_model else ()


ARTIFACTS: dict[str, Artifact] = {
    a.name: a
    for a in (
        Artifact("tf-sapiens", "tf_sapiens"),
        Artifact("tf-exemplar", "tf_exemplar"),
        Artifact("tf-metazoa", "tf_metazoa"),
        Artifact("all-embeddings", "all_embeddings", is_model=False),
    )
}
GROUPS: dict[str, tuple[str, ...]] = {"all": tuple(ARTIFACTS)}
CHOICES = (*ARTIFACTS, *GROUPS)


def resolve_artifacts(name: str) -> list[Artifact]:
    """The artifacts behind a command-line name (``all`` stands for every model and the embeddings)."""
    if name in GROUPS:
        return [ARTIFACTS[n] for n in GROUPS[name]]
    if name not in ARTIFACTS:
        raise ValueError(f"unknown artifact {name!r}; choose from {', '.join(CHOICES)}")
    return [ARTIFACTS[name]]


def artifact_url(artifact: Artifact, base_url: str | None = None) -> str:
    """Address of the archive: ``base_url``, else ``$TRANSCRIPTFORMER_ARTIFACTS_URL``, else the public bucket."""
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return f"{base.rstrip('/')}/{artifact.archive}"


def is_complete(directory: str | Path) -> bool:
    """Whether ``directory`` is a finished download (it holds the completion marker)."""
    return (Path(directory) / COMPLETION_MARKER).is_file()


def download_artifact(
    artifact: Artifact,
    checkpoint_dir: str | Path = "checkpoints",
    *,
    base_url: str | None = None,
    sha256: str | None = None,
    force: bool = False,
    retry: RetryPolicy | None = None,
    progress: bool = True,
    max_expansion: float = MAX_EXPANSION,
) -> Path:
    """Download and extract one artifact into ``checkpoint_dir/<artifact.directory>``.

    Parameters
    ----------
    artifact
        What to fetch (see :data:`ARTIFACTS`).
    checkpoint_dir
        Parent folder of the extracted checkpoint; created when missing, and removed again when a failed download
        leaves it empty.
    base_url
        Overrides the base address (see :func:`artifact_url`).
    sha256
        Expected SHA-256 of the archive; defaults to the published one, when known.
    force
        Download again even when a finished download is there, and replace a folder that is not one.
    retry
        Retry policy of the download.
    progress
        Show a progress bar.
    max_expansion
        The unpacked files may total at most this many times the archive's size (see :func:`extract_archive`).

    Returns
    -------
    Path
        The extracted folder.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise NotADirectoryError(
            f"{checkpoint_dir} is a file, not a folder: choose another checkpoint_dir (it is created when missing)"
        )
    target = checkpoint_dir / artifact.directory
    if is_complete(target) and not force:
        logger.info("%s is already downloaded in %s", artifact.name, target)
        return target
    if target.exists() and not force:
        raise FileExistsError(
            f"{target} exists but is not a finished download (no {COMPLETION_MARKER}); "
            "move it away or pass `force=True` to replace it"
        )
    url = artifact_url(artifact, base_url)
    archive = checkpoint_dir / DOWNLOADS_DIR / artifact.archive
    created = _missing_folders(checkpoint_dir)  # removed again when the download leaves them empty
    logger.info("downloading %s from %s", artifact.name, url)
    try:
        result = download_file(url, archive, sha256=sha256 or artifact.sha256, retry=retry, progress=progress)
        extract_archive(
            archive,
            target,
            artifact.directory,
            marker=completion_record(artifact, url, result),
            max_expansion=max_expansion,
            layout=artifact.layout,
        )
    finally:
        archive.unlink(missing_ok=True)  # a broken download keeps its .part file, to resume from
        for folder in (archive.parent, *created):
            _remove_if_empty(folder)
    return target


def completion_record(artifact: Artifact, url: str, result: DownloadResult) -> dict[str, object]:
    """What the completion marker says about a download."""
    return {
        "artifact": artifact.name,
        "url": url,
        "archive_bytes": result.size,
        "archive_sha256": result.sha256,
        "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def extract_archive(
    archive: str | Path,
    target: str | Path,
    top_level: str,
    marker: dict[str, object],
    *,
    max_expansion: float = MAX_EXPANSION,
    layout: tuple[str, ...] = (),
) -> None:
    """Safely extract the ``top_level`` folder of a tar archive to ``target``, atomically, with a marker.

    Parameters
    ----------
    archive
        A ``.tar``, ``.tar.gz``, ``.tar.bz2`` or ``.tar.xz`` file.
    target
        Destination folder; replaced when it exists.
    top_level
        Folder of the archive that becomes ``target``.
    marker
        Written as JSON to ``target/.transcriptformer-download.json``.
    max_expansion
        The members (and their tar headers) may total at most this many times the archive's size (at least 1 MiB).
    layout
        Files (and folders, ending in ``/``) that ``top_level`` must hold, e.g. :data:`CHECKPOINT_LAYOUT`.

    Raises
    ------
    ArchiveError
        Corrupt archive, an unsafe member (absolute path, ``..``, a symbolic or hard link, device file), more
        unpacked bytes than allowed, no ``top_level`` folder, or a folder without the ``layout``. Nothing is
        left behind.
    """
    archive, target = Path(archive), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        _extract_all(archive, staging, _MemberFilter(archive, max_expansion))
        root = staging / top_level
        if not root.is_dir():
            found = sorted(p.name for p in staging.iterdir())
            raise ArchiveError(f"{archive.name} has no top-level folder {top_level}/ (it holds {found})")
        _check_layout(root, layout, f"{archive.name}: {top_level}/")
        (root / COMPLETION_MARKER).write_text(json.dumps(marker, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(root, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _MemberFilter:
    """The ``tarfile`` ``data`` filter, stricter: no absolute names, no links of any kind, a budget of bytes.

    The bytes unpacked are counted against ``max_expansion`` times the archive's size, a guard against
    decompression bombs.
    """

    def __init__(self, archive: Path, max_expansion: float):
        self.archive, self.max_expansion = archive, max_expansion
        self.budget = max(int(archive.stat().st_size * max_expansion), MIN_UNPACKED_BYTES)

    def __call__(self, member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo | None:
        if member.name.startswith(("/", "\\")) or os.path.isabs(member.name):
            raise tarfile.AbsolutePathError(member)
        if member.issym() or member.islnk():
            kind = "a symbolic link" if member.issym() else "a hard link"
            raise ArchiveError(
                f"{self.archive.name}: refusing to extract an unsafe member: {member.name!r} is {kind} "
                f"(to {member.linkname!r}); archives of checkpoints hold no links"
            )
        self.spend(tarfile.BLOCKSIZE + member.size)
        return tarfile.data_filter(member, dest_path)

    def spend(self, n_bytes: int) -> None:
        """Count ``n_bytes`` more unpacked; refuse the archive when they exceed the budget."""
        self.budget -= n_bytes
        if self.budget < 0:
            raise ArchiveError(
                f"{self.archive.name} unpacks to more than {self.max_expansion:g} times its size "
                f"({self.archive.stat().st_size} bytes), like a decompression bomb; nothing was kept. If you trust "
                "the archive, raise the limit with max_expansion"
            )


def _extract_all(archive: Path, dest: Path, member_filter: _MemberFilter) -> None:
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError("safe archive extraction needs Python >= 3.11.4 (tarfile extraction filters)")
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(dest, filter=member_filter)
            # tarfile stops at the end-of-archive blocks; reading on to the end of the compressed stream makes
            # gzip, bz2 or xz verify their checksum, which catches corruption inside file contents. What follows
            # the last member counts against the budget too.
            while chunk := tar.fileobj.read(CHUNK_SIZE):
                member_filter.spend(len(chunk))
    except tarfile.FilterError as err:
        raise ArchiveError(f"{archive.name}: refusing to extract an unsafe member: {err}") from err
    except (tarfile.ReadError, EOFError, OSError, lzma.LZMAError, zlib.error) as err:
        raise ArchiveError(f"{archive.name} is not a valid tar archive (corrupted or truncated): {err}") from err


def _check_layout(root: Path, layout: tuple[str, ...], shown: str) -> None:
    """Refuse an extracted folder that lacks one of the files or folders (ending in ``/``) of ``layout``."""
    missing = [
        entry for entry in layout if not ((root / entry).is_dir() if entry.endswith("/") else (root / entry).is_file())
    ]
    if missing:
        raise ArchiveError(f"{shown} is not a checkpoint: it lacks {', '.join(missing)}; nothing was kept")


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, deepest first."""
    return list(itertools.takewhile(lambda path: not path.exists(), (folder, *folder.parents)))


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
