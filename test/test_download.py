import gzip
import hashlib
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

import transcriptformer
from local_http_server import LocalServer, unused_port_url
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.cli import main
from transcriptformer.hub.artifacts import (
    ARTIFACTS,
    BASE_URL_ENV,
    COMPLETION_MARKER,
    ArchiveError,
    artifact_url,
    download_artifact,
    resolve_artifacts,
)
from transcriptformer.hub.cache import CACHE_ENV, CheckpointNotFoundError, resolve_checkpoint
from transcriptformer.hub.http import ChecksumError, DownloadError, RetryPolicy, download_file

REFERENCE = Path(__file__).parent / "data" / "reference_tiny"
FAST = RetryPolicy(attempts=4, backoff_s=0.01, timeout_s=10)
SAPIENS = ARTIFACTS["tf-sapiens"]


@pytest.fixture
def server():
    with LocalServer() as s:
        yield s


def tar_gz(add_members) -> bytes:
    """A .tar.gz built by ``add_members(tar)``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        add_members(tar)
    return buffer.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, **info) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    for key, value in info.items():
        setattr(member, key, value)
    tar.addfile(member, io.BytesIO(data))


def checkpoint_archive(top: str = "tf_sapiens") -> bytes:
    """The reference checkpoint packed like a published archive: one top-level folder."""
    return tar_gz(lambda tar: tar.add(REFERENCE, arcname=top, filter=lambda m: None if "input" in m.name else m))


def incompressible_archive(n_bytes: int = 3_000_000) -> bytes:
    data = np.random.default_rng(0).bytes(n_bytes)
    return tar_gz(lambda tar: add_bytes(tar, "tf_sapiens/model_weights.pt", data))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_artifact_names_and_urls(monkeypatch):
    assert [a.directory for a in resolve_artifacts("all")] == [
        "tf_sapiens",
        "tf_exemplar",
        "tf_metazoa",
        "all_embeddings",
    ]
    assert artifact_url(SAPIENS) == "https://czi-transcriptformer.s3.amazonaws.com/weights/tf_sapiens.tar.gz"
    monkeypatch.setenv("TRANSCRIPTFORMER_ARTIFACTS_URL", "http://mirror.local/tf/")
    assert artifact_url(SAPIENS) == "http://mirror.local/tf/tf_sapiens.tar.gz"
    assert artifact_url(SAPIENS, "http://other") == "http://other/tf_sapiens.tar.gz"
    with pytest.raises(ValueError, match="unknown artifact 'tf-sapien'"):
        resolve_artifacts("tf-sapien")


def test_downloaded_checkpoint_loads(server, tmp_path):
    archive = server.add("/tf_sapiens.tar.gz", checkpoint_archive()).body
    path = download_artifact(SAPIENS, tmp_path, base_url=server.base_url, retry=FAST, progress=False)
    assert path == tmp_path / "tf_sapiens"
    for name in ["config.json", "model_weights.pt", "vocabs/assay_vocab.json", "vocabs/mus_musculus_gene.h5"]:
        assert (path / name).read_bytes() == (REFERENCE / name).read_bytes()
    checkpoint = load_checkpoint(path)
    assert len(checkpoint.gene_vocab) > 7
    marker = json.loads((path / COMPLETION_MARKER).read_text())
    assert marker["archive_sha256"] == sha256(archive) and marker["archive_bytes"] == len(archive)
    assert leftovers(tmp_path) == ["tf_sapiens"]  # no archive, partial file or staging folder left


def test_dropped_connection_resumes_with_range(server, tmp_path):
    served = server.add("/tf_sapiens.tar.gz", incompressible_archive())
    served.faults.append(("drop", 1_000_000))
    result = download_file(server.url("/tf_sapiens.tar.gz"), tmp_path / "a.tar.gz", retry=FAST, progress=False)
    assert result.path.read_bytes() == served.body and result.sha256 == sha256(served.body)
    assert server.requests == [("/tf_sapiens.tar.gz", None), ("/tf_sapiens.tar.gz", "bytes=1000000-")]
    assert server.bytes_sent == len(served.body)  # nothing was sent twice


def test_interrupted_download_resumes_in_a_later_run(server, tmp_path):
    served = server.add("/x.tar.gz", incompressible_archive())
    served.faults.append(("drop", 700_000))
    dest = tmp_path / "x.tar.gz"
    with pytest.raises(DownloadError, match="after 1 attempt"):
        download_file(server.url("/x.tar.gz"), dest, retry=RetryPolicy(attempts=1), progress=False)
    assert not dest.exists()  # a half-done download never looks complete
    assert (tmp_path / "x.tar.gz.part").stat().st_size == 700_000
    download_file(server.url("/x.tar.gz"), dest, retry=FAST, progress=False)
    assert dest.read_bytes() == served.body
    assert server.requests[-1] == ("/x.tar.gz", "bytes=700000-")
    assert leftovers(tmp_path) == ["x.tar.gz"]


@pytest.mark.parametrize("meta", ['{"url": "http://elsewhere/x.tar.gz", "validator": "\\"abc\\""}', "not json", None])
def test_untrusted_partial_file_is_discarded(server, tmp_path, meta):
    served = server.add("/x.tar.gz", incompressible_archive(200_000))
    (tmp_path / "x.tar.gz.part").write_bytes(b"junk from somewhere else")
    if meta is not None:
        (tmp_path / "x.tar.gz.part.json").write_text(meta)
    download_file(server.url("/x.tar.gz"), tmp_path / "x.tar.gz", retry=FAST, progress=False)
    assert (tmp_path / "x.tar.gz").read_bytes() == served.body
    assert server.requests == [("/x.tar.gz", None)]


def test_file_changed_between_runs_is_fetched_whole(server, tmp_path):
    served = server.add("/x.tar.gz", incompressible_archive())
    served.faults.append(("drop", 500_000))
    dest = tmp_path / "x.tar.gz"
    with pytest.raises(DownloadError):
        download_file(server.url("/x.tar.gz"), dest, retry=RetryPolicy(attempts=1), progress=False)
    new = server.add("/x.tar.gz", incompressible_archive(2_000_000)[::-1])
    download_file(server.url("/x.tar.gz"), dest, retry=FAST, progress=False)
    assert dest.read_bytes() == new.body  # If-Range: the stale half was not glued to the new file


def test_server_without_range_support_restarts(tmp_path):
    with LocalServer(supports_range=False) as server:
        served = server.add("/x.tar.gz", incompressible_archive())
        served.faults.append(("drop", 1_000_000))
        download_file(server.url("/x.tar.gz"), tmp_path / "x", retry=FAST, progress=False)
    assert (tmp_path / "x").read_bytes() == served.body
    assert server.bytes_sent == len(served.body) + 1_000_000


def test_server_errors_are_retried(server, tmp_path):
    served = server.add("/x", b"payload" * 1000)
    served.faults += [("status", 503), ("status", 502)]
    download_file(server.url("/x"), tmp_path / "x", retry=FAST, progress=False)
    assert (tmp_path / "x").read_bytes() == served.body and len(server.requests) == 3


def test_missing_file_fails_at_once(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_artifact(SAPIENS, tmp_path, base_url=server.base_url, retry=FAST, progress=False)
    assert len(server.requests) == 1
    assert not (tmp_path / "tf_sapiens").exists()


def test_offline_gives_a_clear_message(tmp_path):
    url = unused_port_url()
    with pytest.raises(
        DownloadError, match=r"could not reach 127\.0\.0\.1:\d+ .* after 2 attempt\(s\): are you offline"
    ):
        download_artifact(
            SAPIENS, tmp_path, base_url=url, retry=RetryPolicy(attempts=2, backoff_s=0.01), progress=False
        )
    assert not (tmp_path / "tf_sapiens").exists()


def test_checksum_mismatch_discards_the_download(server, tmp_path):
    good = checkpoint_archive()
    server.add("/tf_sapiens.tar.gz", good)
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        download_artifact(SAPIENS, tmp_path, base_url=server.base_url, sha256="0" * 64, retry=FAST, progress=False)
    assert not (tmp_path / "tf_sapiens").exists()
    assert leftovers(tmp_path / ".downloads") == []
    with pytest.raises(ChecksumError, match=f"expected {len(good) + 1} bytes, received {len(good)}"):
        download_file(server.url("/tf_sapiens.tar.gz"), tmp_path / "x", size=len(good) + 1, progress=False)


def test_corrupted_archive_is_refused(server, tmp_path):
    good = checkpoint_archive()
    corrupted = bytearray(good)
    corrupted[len(good) // 2 : len(good) // 2 + 64] = bytes(64)
    server.add("/tf_sapiens.tar.gz", bytes(corrupted))
    # With the published checksum the corruption is caught before extraction ...
    with pytest.raises(ChecksumError):
        download_artifact(SAPIENS, tmp_path, base_url=server.base_url, sha256=sha256(good), progress=False)
    # ... and without one, by the archive reader; either way nothing is extracted.
    with pytest.raises(ArchiveError, match="not a valid"):
        download_artifact(SAPIENS, tmp_path, base_url=server.base_url, progress=False)
    assert leftovers(tmp_path) == []


def device_member(tar: tarfile.TarFile) -> None:
    add_bytes(tar, "tf_sapiens/config.json", b"{}")
    add_bytes(tar, "tf_sapiens/dev", b"", type=tarfile.CHRTYPE, devmajor=1, devminor=3)


def link_member(kind: bytes, target: str):
    """An archive whose ``tf_sapiens/vocabs`` is a link (``kind``) to ``target``."""

    def build(tar: tarfile.TarFile) -> None:
        add_bytes(tar, "tf_sapiens/config.json", b"{}")
        add_bytes(tar, "other/file", b"x")
        add_bytes(tar, "tf_sapiens/vocabs", b"", type=kind, linkname=target)

    return build


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda tar: add_bytes(tar, "tf_sapiens/../../escaped.txt", b"pwned"), "outside the destination"),
        (lambda tar: add_bytes(tar, "/tmp/absolute-escape.txt", b"pwned"), "absolute path"),
        (link_member(tarfile.SYMTYPE, "../../outside"), "symbolic link"),
        # inside the staging folder, but outside tf_sapiens/ once it is moved into place
        (link_member(tarfile.SYMTYPE, "../other"), "symbolic link"),
        (link_member(tarfile.LNKTYPE, "other/file"), "hard link"),
        (device_member, "special file"),
    ],
    ids=["dotdot", "absolute", "symlink", "symlink-inside", "hardlink", "device"],
)
def test_unsafe_archives_are_refused(server, tmp_path, build, reason):
    checkpoints = tmp_path / "checkpoints"
    server.add("/tf_sapiens.tar.gz", tar_gz(build))
    with pytest.raises(ArchiveError, match=f"unsafe member.*{reason}"):
        download_artifact(SAPIENS, checkpoints, base_url=server.base_url, progress=False)
    assert leftovers(checkpoints) == []
    assert leftovers(tmp_path) == []  # nothing escaped, and the checkpoints folder it created is gone
    assert not Path("/tmp/absolute-escape.txt").exists()


def test_archive_without_the_expected_folder(server, tmp_path):
    server.add("/tf_sapiens.tar.gz", checkpoint_archive(top="something_else"))
    with pytest.raises(ArchiveError, match=r"no top-level folder tf_sapiens/ \(it holds \['something_else'\]\)"):
        download_artifact(SAPIENS, tmp_path, base_url=server.base_url, progress=False)
    assert leftovers(tmp_path) == []


def test_existing_folder_is_kept_unless_forced(server, tmp_path):
    server.add("/tf_sapiens.tar.gz", checkpoint_archive())
    mine = tmp_path / "tf_sapiens"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own files")
    with pytest.raises(FileExistsError, match="not a finished download"):
        download_artifact(SAPIENS, tmp_path, base_url=server.base_url, progress=False)
    assert (mine / "notes.txt").read_text() == "my own files"
    download_artifact(SAPIENS, tmp_path, base_url=server.base_url, force=True, progress=False)
    assert not (mine / "notes.txt").exists() and (mine / "config.json").exists()


def test_cli_downloads_once_and_reports_failures(server, tmp_path, capsys):
    server.add("/tf_sapiens.tar.gz", checkpoint_archive())
    args = ["download", "tf-sapiens", "--checkpoint-dir", str(tmp_path), "--base-url", server.base_url]
    assert main([*args, "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"Output: {(tmp_path / 'tf_sapiens').resolve()}"
    assert main([*args, "--no-progress"]) == 0  # already complete: nothing fetched again
    assert len(server.requests) == 1
    assert os.listdir(tmp_path / "tf_sapiens")
    code = main(["download", "tf-exemplar", "--checkpoint-dir", str(tmp_path), "--base-url", server.base_url])
    assert code == 1
    err = capsys.readouterr().err
    assert "error: tf-exemplar:" in err and "HTTP 404" in err


def test_load_by_name_downloads_once_into_the_cache(tmp_path, monkeypatch, expected):
    cache = tmp_path / "cache"
    with LocalServer() as server:
        server.add("/tf_sapiens.tar.gz", checkpoint_archive())
        monkeypatch.setenv(BASE_URL_ENV, server.base_url)
        transcriptformer.load("tf-sapiens", device="cpu", cache_dir=cache)
        assert server.requests == [("/tf_sapiens.tar.gz", None)]
    assert leftovers(cache) == [".locks", "tf_sapiens"]
    # The server is gone: the second load reads the cache (found here through $TRANSCRIPTFORMER_CACHE).
    monkeypatch.setenv(CACHE_ENV, str(cache))
    model = transcriptformer.load("tf-sapiens", device="cpu")
    assert model.checkpoint.path == cache / "tf_sapiens"
    np.testing.assert_allclose(model.embed(REFERENCE / "input.h5ad"), expected["embeddings"], rtol=1e-4, atol=1e-6)


def test_load_by_name_resumes_a_half_finished_download(server, tmp_path, monkeypatch):
    archive = server.add("/tf_sapiens.tar.gz", checkpoint_archive())
    half = len(archive.body) // 2
    archive.faults += [("drop", half), ("status", 404)]  # the connection breaks, then the retry fails for good
    monkeypatch.setenv(BASE_URL_ENV, server.base_url)
    with pytest.raises(DownloadError, match="HTTP 404"):
        transcriptformer.load("tf-sapiens", device="cpu", cache_dir=tmp_path)
    assert not (tmp_path / "tf_sapiens").exists()  # half an archive is never taken for a checkpoint
    transcriptformer.load("tf-sapiens", device="cpu", cache_dir=tmp_path)
    assert server.requests[-1] == ("/tf_sapiens.tar.gz", f"bytes={half}-")
    assert server.bytes_sent == len(archive.body)


def test_concurrent_loads_share_one_download(server, tmp_path, monkeypatch):
    archive = server.add("/tf_sapiens.tar.gz", checkpoint_archive())
    archive.faults.append(("drop", len(archive.body) // 2))  # the first download pauses for a retry
    monkeypatch.setenv(BASE_URL_ENV, server.base_url)
    start = threading.Barrier(2)
    paths = []

    def resolve() -> None:
        start.wait()
        paths.append(resolve_checkpoint("tf-sapiens", tmp_path))

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert paths == [tmp_path / "tf_sapiens"] * 2
    assert server.paths_requested() == ["/tf_sapiens.tar.gz"] * 2  # one download and its resume, nothing more
    assert server.bytes_sent == len(archive.body)


def test_load_names_a_published_model_or_a_folder(tmp_path, reference_dir):
    pattern = "did you mean 'tf-sapiens'.*tf-sapiens, tf-exemplar, tf-metazoa .*`transcriptformer download NAME`"
    with pytest.raises(CheckpointNotFoundError, match=pattern):
        transcriptformer.load("tf-sapien", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="'all-embeddings': no such checkpoint folder, and not a published"):
        transcriptformer.load("all-embeddings", cache_dir=tmp_path)
    assert leftovers(tmp_path) == []
    assert resolve_checkpoint(reference_dir, tmp_path) == reference_dir  # a folder is used as it is


def test_offline_download_leaves_no_folder_behind(tmp_path, capsys):
    checkpoints = tmp_path / "new" / "checkpoints"
    args = ["download", "tf-sapiens", "--checkpoint-dir", str(checkpoints), "--base-url", unused_port_url()]
    assert main([*args, "--retries", "1"]) == 1
    assert "are you offline" in capsys.readouterr().err
    assert leftovers(tmp_path) == []  # neither checkpoints/ nor new/, which the command had created


def zeros_member(n_bytes: int):
    """The reference checkpoint plus ``n_bytes`` of zeros, which gzip shrinks about a thousandfold."""

    def build(tar: tarfile.TarFile) -> None:
        tar.add(REFERENCE, arcname="tf_sapiens", filter=lambda m: None if "input" in m.name else m)
        add_bytes(tar, "tf_sapiens/padding.bin", bytes(n_bytes))

    return build


@pytest.mark.parametrize(
    "archive",
    [
        lambda: tar_gz(zeros_member(40_000_000)),
        # zeros after the end of the tar stream: never written, but decompressed to check the gzip stream
        lambda: checkpoint_archive() + gzip.compress(bytes(40_000_000)),
    ],
    ids=["member", "after-the-archive"],
)
def test_decompression_bomb_is_refused_unless_allowed(server, tmp_path, capsys, archive):
    body = server.add("/tf_sapiens.tar.gz", archive()).body
    args = ["download", "tf-sapiens", "--checkpoint-dir", str(tmp_path), "--base-url", server.base_url, "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"tf_sapiens.tar.gz unpacks to more than 10 times its size ({len(body)} bytes)" in err
    assert "raise the limit with --max-expansion" in err
    assert leftovers(tmp_path) == []  # no folder, no staging folder, no archive
    assert main([*args, "--max-expansion", "100"]) == 0  # trusted: allowed explicitly
    assert (tmp_path / "tf_sapiens" / COMPLETION_MARKER).is_file()


@pytest.mark.parametrize("missing", ["config.json", "model_weights.pt", "vocabs"])
def test_extracted_checkpoint_layout_is_verified(server, tmp_path, capsys, missing):
    archive = tar_gz(
        lambda tar: tar.add(REFERENCE, arcname="tf_sapiens", filter=lambda m: None if missing in m.name else m)
    )
    server.add("/tf_sapiens.tar.gz", archive)
    with pytest.raises(ArchiveError, match=f"tf_sapiens.tar.gz: tf_sapiens/ is not a checkpoint: it lacks {missing}"):
        download_artifact(SAPIENS, tmp_path, base_url=server.base_url, progress=False)
    assert leftovers(tmp_path) == []
    # The embeddings archive is no checkpoint: only its folder is required.
    server.add("/all_embeddings.tar.gz", tar_gz(lambda tar: add_bytes(tar, "all_embeddings/x_gene.h5", b"table")))
    path = download_artifact(ARTIFACTS["all-embeddings"], tmp_path, base_url=server.base_url, progress=False)
    assert (path / "x_gene.h5").read_bytes() == b"table"


def test_stalled_server_is_not_called_offline(server, tmp_path, capsys):
    served = server.add("/tf_sapiens.tar.gz", incompressible_archive(2_000_000))
    served.faults.append(("stall", 300_000))
    with pytest.raises(DownloadError, match=r"stalled after 300000 bytes \(nothing received for 0.5 s\)") as error:
        download_file(server.url("/tf_sapiens.tar.gz"), tmp_path / "x", retry=RetryPolicy(attempts=1, timeout_s=0.5))
    assert "offline" not in str(error.value)
    assert not (tmp_path / "x").exists() and (tmp_path / "x.part").stat().st_size == 300_000
    # The command line says the same.
    served.faults.append(("stall", 100_000))
    args = ["download", "tf-sapiens", "--checkpoint-dir", str(tmp_path), "--base-url", server.base_url]
    assert main([*args, "--retries", "1", "--timeout", "0.5", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "download failed after 1 attempt(s): stalled after 100000 bytes" in err
    assert not (tmp_path / "tf_sapiens").exists()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/tf_sapiens.tar.gz", "127.0.0.1/x.tar.gz"])
def test_unsupported_url_scheme_fails_at_once(tmp_path, capsys, url):
    slow = RetryPolicy(attempts=5, backoff_s=30)  # a retry would wait 30 s: none may happen
    with pytest.raises(DownloadError, match="unsupported address scheme"):
        download_file(url, tmp_path / "x", retry=slow, progress=False)
    assert leftovers(tmp_path) == []
    base = url.rsplit("/", 1)[0]
    assert main(["download", "tf-sapiens", "--checkpoint-dir", str(tmp_path), "--base-url", base]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unsupported address scheme" in err and "after" not in err
    assert not (tmp_path / "tf_sapiens").exists()
