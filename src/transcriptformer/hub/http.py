"""Streamed HTTP downloads that survive flaky connections.

:func:`download_file` writes into ``<dest>.part`` and only renames it to ``dest`` once the whole body has arrived
and its size and checksum are verified, so a file at ``dest`` is always complete. A dropped connection is
retried with exponential backoff and resumed where it stopped with an HTTP ``Range`` request; ``If-Range``
makes the server send the whole file again if it changed in between. The validator (``ETag`` or
``Last-Modified``) is kept in ``<dest>.part.json``, so an interrupted download also resumes in a later run.
Only ``http://`` and ``https://`` addresses are fetched; any other scheme (``file://``, ``ftp://``) is refused at
once, without retries.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

from transcriptformer.console import progress_bar
from transcriptformer.errors import UserError

logger = logging.getLogger(__name__)
T = TypeVar("T")

USER_AGENT = "transcriptformer-downloader"
CHUNK_SIZE = 1 << 20
# Statuses worth another try: timeouts, rate limits and server-side failures.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
SCHEMES = ("http", "https")
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class DownloadError(UserError, RuntimeError):
    """A download failed for good: after all retries, or with an error that retrying cannot fix."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the expected size or SHA-256."""


class _TransientError(Exception):
    """A failure that another attempt may not see (dropped connection, 5xx, short body)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry.

    Attributes
    ----------
    attempts : int
        Total number of attempts, the first included.
    backoff_s : float
        Wait after the first failure; doubled after each further failure.
    max_backoff_s : float
        Upper bound on one wait.
    timeout_s : float
        Socket timeout: how long a connect or a read may stall.
    """

    attempts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")

    def wait_s(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))


@dataclass(frozen=True)
class DownloadResult:
    """A completed download.

    Attributes
    ----------
    path : Path
        The file.
    size : int
        Its size in bytes.
    sha256 : str
        Its SHA-256, hex.
    """

    path: Path
    size: int
    sha256: str


class PartialFile:
    """The ``.part`` file of a download, with its running SHA-256 and resume metadata."""

    def __init__(self, dest: Path, url: str):
        self.path = dest.with_name(dest.name + ".part")
        self.meta_path = dest.with_name(dest.name + ".part.json")
        self.url = url
        self.validator: str | None = None
        self.total: int | None = None
        self.hasher = hashlib.sha256()
        self._load()

    @property
    def size(self) -> int:
        """Bytes received so far."""
        return self.path.stat().st_size if self.path.exists() else 0

    def _load(self) -> None:
        """Adopt an earlier run's partial file when it was for the same URL; discard it otherwise."""
        if not self.path.exists():
            return
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        if not isinstance(meta, dict) or meta.get("url") != self.url or not meta.get("validator"):
            self.discard()
            return
        self.validator, self.total = meta["validator"], meta.get("total")
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK_SIZE), b""):
                self.hasher.update(chunk)

    def start(self, offset: int, validator: str | None, total: int | None) -> None:
        """Begin writing at ``offset`` (0 discards what was there) and record how to resume."""
        if offset == 0:
            self.discard()
        self.validator, self.total = validator, total
        self.meta_path.write_text(json.dumps({"url": self.url, "validator": validator, "total": total}))

    def append(self, chunk: bytes, handle: BinaryIO) -> None:
        """Write ``chunk`` through the open ``handle`` and hash it."""
        handle.write(chunk)
        self.hasher.update(chunk)

    def discard(self) -> None:
        """Forget everything received."""
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)
        self.hasher = hashlib.sha256()
        self.validator, self.total = None, None

    def finish(self, dest: Path) -> None:
        """Move the complete file into place (atomic on one file system)."""
        os.replace(self.path, dest)
        self.meta_path.unlink(missing_ok=True)


def download_file(
    url: str,
    dest: str | Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    retry: RetryPolicy | None = None,
    progress: bool = True,
    label: str | None = None,
) -> DownloadResult:
    """Download ``url`` to ``dest``, resuming, retrying and verifying.

    Parameters
    ----------
    url
        ``http://`` or ``https://`` address.
    dest
        Final path; its folder is created. An existing file there is replaced once the new one is complete.
    size
        Expected size in bytes, when known.
    sha256
        Expected SHA-256 (hex), when known.
    retry
        Retry policy; :class:`RetryPolicy` defaults when omitted.
    progress
        Show a progress bar on stderr.
    label
        Name shown by the progress bar; the file name by default.

    Returns
    -------
    DownloadResult

    Raises
    ------
    DownloadError
        When the server cannot be reached, answers with an error, or the body keeps breaking off.
    ChecksumError
        When the file arrived but is not the expected size or SHA-256; the partial file is removed.
    UserError
        When ``sha256`` is not 64 hexadecimal digits, or the address is not ``http(s)://``; nothing is fetched.
    """
    if sha256 is not None and not SHA256_HEX.fullmatch(sha256):
        raise UserError(f"the expected SHA-256 (`sha256`) {sha256!r} is not 64 hexadecimal digits; copy it whole")
    check_scheme(url)
    retry = retry or RetryPolicy()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = PartialFile(dest, url)
    label = label or dest.name
    with_retries(url, retry, lambda: _transfer(url, partial, retry.timeout_s, progress, label), partial)
    received, digest = partial.size, partial.hasher.hexdigest()
    problem = _verification_problem(received, digest, size, sha256)
    if problem:
        partial.discard()
        raise ChecksumError(f"{url}: {problem}; the download was discarded")
    partial.finish(dest)
    return DownloadResult(dest, received, digest)


def fetch_json(url: str, retry: RetryPolicy | None = None) -> Any:
    """GET ``url`` and parse its JSON body, retrying like :func:`download_file`.

    Raises
    ------
    DownloadError
        When the server cannot be reached, answers with an error, or the body is not JSON.
    """
    check_scheme(url)
    retry = retry or RetryPolicy()
    body = with_retries(url, retry, lambda: _read_all(url, retry.timeout_s))
    try:
        return json.loads(body)
    except ValueError as err:
        raise DownloadError(f"{url} did not answer with JSON: {body[:200]!r}") from err


def check_scheme(url: str) -> None:
    """Refuse an address that is not ``http://`` or ``https://`` (:class:`DownloadError`), before any attempt."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        shown = f"{scheme}://" if scheme else "none"
        raise DownloadError(f"{url}: unsupported address scheme ({shown}); give an https:// (or http://) address")


def with_retries(url: str, retry: RetryPolicy, attempt: Callable[[], T], partial: PartialFile | None = None) -> T:
    """Call ``attempt`` until it succeeds, waiting between transient failures; raise :class:`DownloadError`."""
    for number in range(1, retry.attempts + 1):
        try:
            return attempt()
        except urllib.error.HTTPError as err:
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
        except _TransientError as err:
            if number == retry.attempts:
                raise DownloadError(_failure_message(url, err, number)) from err
            wait = retry.wait_s(number)
            resume = f" from byte {partial.size}" if partial is not None and partial.size else ""
            logger.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.1f s%s",
                url,
                number,
                retry.attempts,
                err,
                wait,
                resume,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def _open(url: str, headers: dict[str, str], timeout_s: float) -> http.client.HTTPResponse:
    """Send a GET; network failures and retryable statuses become :class:`_TransientError`.

    Other HTTP errors propagate as :class:`urllib.error.HTTPError` for the caller to judge.
    """
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code in RETRY_STATUSES:
            raise _TransientError(f"HTTP {err.code}") from err
        raise
    except urllib.error.URLError as err:
        if isinstance(err.reason, socket.gaierror):  # no name resolution: offline, retrying will not help
            raise DownloadError(_failure_message(url, err, 1)) from err
        raise _TransientError(str(err.reason)) from err
    except TimeoutError as err:  # connected, but the answer did not come
        raise _TransientError(f"the server stalled: no answer within {timeout_s:g} s") from err
    except (OSError, http.client.HTTPException) as err:
        raise _TransientError(str(err)) from err


def _read_all(url: str, timeout_s: float) -> bytes:
    with _open(url, {"Accept": "application/json"}, timeout_s) as response:
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as err:
            raise _TransientError(f"connection lost: {err}") from err


def _transfer(url: str, partial: PartialFile, timeout_s: float, progress: bool, label: str) -> None:
    """One attempt: fetch the missing bytes of ``partial`` (all of them, or from where it stopped)."""
    # Without a validator the server cannot tell whether the stored bytes still belong to the same file.
    offset = partial.size if partial.validator else 0
    if offset and offset == partial.total:
        return
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers |= {"Range": f"bytes={offset}-", "If-Range": partial.validator}
    try:
        response = _open(url, headers, timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the range starts at or past the end: the stored part is unusable
            partial.discard()
            raise _TransientError(f"server refused to resume at byte {offset}") from err
        raise
    with response:
        offset = _resume_offset(response, offset)
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        partial.start(offset, response.headers.get("ETag") or response.headers.get("Last-Modified"), total)
        _stream_body(response, partial, offset, total, progress, label, timeout_s)


def _resume_offset(response: http.client.HTTPResponse, offset: int) -> int:
    """Where the body of ``response`` starts: ``offset`` for a matching 206, else 0 (a full 200 body)."""
    if response.status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != offset:
        raise _TransientError(f"server answered a resume at byte {offset} with {response.headers['Content-Range']}")
    return offset


def _stream_body(
    response: http.client.HTTPResponse,
    partial: PartialFile,
    offset: int,
    total: int | None,
    progress: bool,
    label: str,
    timeout_s: float,
) -> None:
    """Append the body to the partial file; a body that ends early or stalls is a transient error."""
    bar = progress_bar(
        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=not progress
    )
    try:
        with open(partial.path, "ab") as handle:
            while chunk := response.read1(CHUNK_SIZE):  # what has arrived: a stall loses nothing
                partial.append(chunk, handle)
                bar.update(len(chunk))
    except TimeoutError as err:
        raise _TransientError(f"stalled after {partial.size} bytes (nothing received for {timeout_s:g} s)") from err
    except (OSError, http.client.HTTPException) as err:
        raise _TransientError(f"connection lost after {partial.size} bytes") from err
    finally:
        bar.close()
    if total is not None and partial.size < total:
        raise _TransientError(f"connection closed after {partial.size} of {total} bytes")


def _verification_problem(received: int, digest: str, size: int | None, sha256: str | None) -> str | None:
    """Why the received file is not the expected one, or ``None`` when it is."""
    if size is not None and received != size:
        return f"expected {size} bytes, received {received}"
    if sha256 is not None and digest != sha256.lower():
        return f"SHA-256 mismatch (expected {sha256.lower()}, got {digest}): the file is corrupted"
    return None


def _failure_message(url: str, err: BaseException, attempts: int) -> str:
    """A message that says whether the network, rather than the file, is the problem.

    ``err`` is the :class:`urllib.error.URLError` of a failed connection, or the :class:`_TransientError` of the
    last attempt; only a connection that could not be made is reported as "could not reach".
    """
    host = urlsplit(url).netloc
    cause = err if isinstance(err, urllib.error.URLError) else err.__cause__
    reason = cause.reason if isinstance(cause, urllib.error.URLError) else None
    if isinstance(reason, socket.gaierror | ConnectionRefusedError | TimeoutError) or (
        isinstance(reason, OSError) and reason.errno in (101, 113)  # network / host unreachable
    ):
        return (
            f"could not reach {host} ({reason}) after {attempts} attempt(s): are you offline, or behind a proxy "
            "(set HTTPS_PROXY)?"
        )
    return f"{url}: download failed after {attempts} attempt(s): {err}"
