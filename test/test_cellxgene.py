import hashlib
import json
from pathlib import Path

import anndata as ad
import pytest
from filelock import FileLock

from local_http_server import LocalServer, unused_port_url
from transcriptformer.cli import main
from transcriptformer.hub.cellxgene import (
    DATASETS_ENDPOINT,
    DOWNLOAD_LOCK,
    METADATA_FILE,
    SUCCESS_MARKER,
    DatasetFilter,
    api_url,
    download_datasets,
    fetch_datasets,
    select_datasets,
    total_bytes,
)
from transcriptformer.hub.http import DownloadError, RetryPolicy

DATA = Path(__file__).parent / "data"
HUMAN = (DATA / "human_symbols_16cells.h5ad").read_bytes()
MOUSE = (DATA / "reference_tiny" / "input.h5ad").read_bytes()
HUMAN_ORGANISM = {"label": "Homo sapiens", "ontology_term_id": "NCBITaxon:9606"}
MOUSE_ORGANISM = {"label": "Mus musculus", "ontology_term_id": "NCBITaxon:10090"}
FAST = RetryPolicy(attempts=3, backoff_s=0.01, timeout_s=10)


def record(
    dataset_id,
    url,
    *,
    organisms=(HUMAN_ORGANISM,),
    assay="10x 3' v3",
    tissue="blood",
    primary=(True,),
    cells=16,
    size=1_000,
    disease="normal",
):
    """One dataset as the curation API lists it (fields the downloader reads, plus a few it ignores)."""
    return {
        "collection_id": "c0ffee00-0000-4000-8000-000000000000",
        "dataset_id": dataset_id,
        "dataset_version_id": dataset_id + "-v1",
        "title": f"dataset {dataset_id}",
        "assay": [{"label": assay, "ontology_term_id": "EFO:0009922"}],
        "cell_count": cells,
        "disease": [{"label": disease, "ontology_term_id": "PATO:0000461"}],
        "explorer_url": f"https://cellxgene.cziscience.com/e/{dataset_id}.cxg/",
        "is_primary_data": list(primary),
        "organism": list(organisms),
        "tissue": [{"label": tissue, "ontology_term_id": "UBERON:0000178", "tissue_type": "tissue"}],
        "assets": [
            {"filesize": 10, "filetype": "RDS", "url": url.replace(".h5ad", ".rds")},
            {"filesize": size, "filetype": "H5AD", "url": url},
        ],
    }


def serve_catalogue(server: LocalServer, records: list[dict]) -> None:
    server.add(DATASETS_ENDPOINT, json.dumps(records).encode(), "application/json")


def add_dataset(server: LocalServer, dataset_id: str, body: bytes, **kwargs) -> dict:
    server.add(f"/{dataset_id}.h5ad", body)
    return record(dataset_id, server.url(f"/{dataset_id}.h5ad"), size=len(body), **kwargs)


@pytest.fixture
def server():
    with LocalServer() as s:
        yield s


def test_filters_follow_the_api_fields():
    url = "http://127.0.0.1:1/x.h5ad"
    records = [
        record("human-blood", url, cells=5000),
        record("human-lung-smartseq", url, tissue="lung", assay="Smart-seq2", cells=300),
        record("mouse", url, organisms=(MOUSE_ORGANISM,)),
        record("xenograft", url, organisms=(HUMAN_ORGANISM, MOUSE_ORGANISM)),
        record("duplicate-cells", url, primary=(True, False)),
        record("covid", url, disease="COVID-19"),
    ]

    def ids(criteria, limit=None):
        return [d["dataset_id"] for d in select_datasets(records, criteria, limit)]

    assert ids(DatasetFilter(species=("homo sapiens",))) == ["human-blood", "human-lung-smartseq", "covid"]
    assert ids(DatasetFilter(species=("Homo_Sapiens",), primary_only=False)) == [
        "human-blood",
        "human-lung-smartseq",
        "duplicate-cells",
        "covid",
    ]
    assert ids(DatasetFilter(species=("NCBITaxon:10090", "homo sapiens"), tissues=("lung", "blood"))) == [
        "human-blood",
        "human-lung-smartseq",
        "mouse",
        "covid",
    ]
    assert ids(DatasetFilter(species=("homo sapiens",), assays=("10x",), diseases=("normal",))) == ["human-blood"]
    assert ids(DatasetFilter(species=("homo sapiens",), min_cells=100, max_cells=1000)) == ["human-lung-smartseq"]
    assert ids(DatasetFilter(species=("homo sapiens",)), limit=1) == ["human-blood"]
    assert ids(DatasetFilter(dataset_ids=("mouse", "covid"))) == ["mouse", "covid"]
    assert ids(DatasetFilter(species=("danio rerio",))) == []


def test_api_address_can_be_overridden(monkeypatch):
    assert api_url() == "https://api.cellxgene.cziscience.com/curation/v1/datasets"
    monkeypatch.setenv("TRANSCRIPTFORMER_CELLXGENE_API", "http://127.0.0.1:9/")
    assert api_url() == "http://127.0.0.1:9/curation/v1/datasets"


def test_download_data_by_species(server, tmp_path, capsys):
    flaky = add_dataset(server, "human-a", HUMAN)
    server.files["/human-a.h5ad"].faults.append(("drop", 100_000))
    records = [
        flaky,
        add_dataset(server, "human-b", HUMAN, cells=16),
        add_dataset(server, "mouse-a", MOUSE, organisms=(MOUSE_ORGANISM,)),
        add_dataset(server, "human-dup", HUMAN, primary=(False,)),
    ]
    serve_catalogue(server, records)
    out = tmp_path / "cellxgene"
    args = ["download-data", "--species", "homo sapiens", "--api-url", server.base_url, "--output-path", str(out)]
    assert main([*args, "--workers", "2"]) == 0
    assert "2 of 4 datasets selected" in capsys.readouterr().out
    for dataset_id in ["human-a", "human-b"]:
        folder = out / dataset_id
        assert (folder / "full.h5ad").read_bytes() == HUMAN
        assert ad.read_h5ad(folder / "full.h5ad").shape == (16, 9753)
        assert json.loads((folder / SUCCESS_MARKER).read_text())["bytes"] == len(HUMAN)
    assert sorted(p.name for p in out.iterdir()) == ["dataset_metadata.json", "human-a", "human-b"]
    assert [d["dataset_id"] for d in json.loads((out / METADATA_FILE).read_text())] == ["human-a", "human-b"]
    assert "/mouse-a.h5ad" not in server.paths_requested() and "/human-dup.h5ad" not in server.paths_requested()
    assert ("/human-a.h5ad", "bytes=100000-") in server.requests  # the dropped download resumed

    fetched = len(server.requests)
    assert main(args) == 0  # a second run finds the completion markers and fetches only the list
    assert server.paths_requested()[fetched:] == [DATASETS_ENDPOINT]
    assert "skipped" in capsys.readouterr().out


def test_failed_datasets_are_reported_and_left_unmarked(server, tmp_path):
    good = add_dataset(server, "good", MOUSE, organisms=(MOUSE_ORGANISM,))
    server.files["/good.h5ad"].faults.append(("status", 503))
    missing = record("missing", server.url("/missing.h5ad"), organisms=(MOUSE_ORGANISM,))
    wrong_size = add_dataset(server, "wrong-size", MOUSE, organisms=(MOUSE_ORGANISM,))
    wrong_size["assets"][1]["filesize"] += 1
    unsafe = record("../escape", server.url("/good.h5ad"), organisms=(MOUSE_ORGANISM,))
    outcomes = download_datasets([good, missing, wrong_size, unsafe], tmp_path / "out", workers=3, retry=FAST)
    status = {o.dataset_id: (o.status, o.error) for o in outcomes}
    assert status["good"] == ("downloaded", None)
    assert status["missing"][0] == "failed" and "HTTP 404" in status["missing"][1]
    assert status["wrong-size"][0] == "failed" and f"expected {len(MOUSE) + 1} bytes" in status["wrong-size"][1]
    assert status["../escape"] == ("failed", "refusing unsafe dataset id '../escape'")
    assert not (tmp_path / "escape").exists()
    for name in ["missing", "wrong-size"]:
        assert not (tmp_path / "out" / name / SUCCESS_MARKER).exists()
        assert not (tmp_path / "out" / name / "full.h5ad").exists()


def test_cli_exit_code_when_a_dataset_fails(server, tmp_path, capsys):
    serve_catalogue(server, [record("gone", server.url("/gone.h5ad"))])
    code = main(
        [
            "download-data",
            "--species",
            "homo sapiens",
            "--api-url",
            server.base_url,
            "--output-path",
            str(tmp_path),
            "--max-retries",
            "1",
        ]
    )
    assert code == 1
    captured = capsys.readouterr()
    assert "0 of 1 datasets ready" in captured.out and "1 failed" in captured.out
    assert captured.out.splitlines()[-1] == f"Output: {tmp_path.resolve()}"
    assert "HTTP 404" in captured.err


def test_dry_run_downloads_nothing(server, tmp_path, capsys):
    records = [add_dataset(server, "human-a", HUMAN), add_dataset(server, "human-b", HUMAN)]
    serve_catalogue(server, records)
    code = main(
        [
            "download-data",
            "--species",
            "homo sapiens",
            "--api-url",
            server.base_url,
            "--output-path",
            str(tmp_path / "out"),
            "--dry-run",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"{total_bytes(records) / 1e9:.2f} GB" in out and "human-a" in out and "human-b" in out
    assert server.paths_requested() == [DATASETS_ENDPOINT]
    assert not (tmp_path / "out").exists()


def test_unreachable_or_broken_api(server, tmp_path, capsys):
    code = main(
        [
            "download-data",
            "--species",
            "homo sapiens",
            "--api-url",
            unused_port_url(),
            "--output-path",
            str(tmp_path),
            "--max-retries",
            "1",
        ]
    )
    assert code == 1
    assert "cannot list CELLxGENE datasets: could not reach" in capsys.readouterr().err
    server.add(DATASETS_ENDPOINT, b"<html>maintenance</html>", "text/html")
    with pytest.raises(DownloadError, match="did not answer with JSON"):
        fetch_datasets(server.base_url, FAST)
    server.add(DATASETS_ENDPOINT, b'{"detail": "oops"}', "application/json")
    with pytest.raises(DownloadError, match="expected a list of datasets"):
        fetch_datasets(server.base_url, FAST)


def test_api_records_are_not_trusted_blindly(server, tmp_path, capsys):
    good = add_dataset(server, "good", MOUSE, organisms=(MOUSE_ORGANISM,))
    pinned = add_dataset(server, "pinned", MOUSE, organisms=(MOUSE_ORGANISM,))
    pinned["assets"][1]["sha256"] = hashlib.sha256(MOUSE).hexdigest()
    wrong_digest = add_dataset(server, "wrong-digest", MOUSE, organisms=(MOUSE_ORGANISM,))
    wrong_digest["assets"][1]["sha256"] = hashlib.sha256(b"other").hexdigest()
    bad_digest = add_dataset(server, "bad-digest", MOUSE, organisms=(MOUSE_ORGANISM,))
    bad_digest["assets"][1]["sha256"] = "abc"
    no_size = add_dataset(server, "no-size", MOUSE, organisms=(MOUSE_ORGANISM,))
    del no_size["assets"][1]["filesize"]
    local_file = record("local-file", f"file://{DATA / 'reference_tiny' / 'input.h5ad'}", organisms=(MOUSE_ORGANISM,))
    plain_http = record("plain-http", "http://example.org/x.h5ad", organisms=(MOUSE_ORGANISM,))
    newline_id = add_dataset(server, "newline\n", MOUSE, organisms=(MOUSE_ORGANISM,))
    records = [good, pinned, wrong_digest, bad_digest, no_size, local_file, plain_http, newline_id]
    serve_catalogue(server, records)
    out = tmp_path / "out"
    args = ["download-data", "--species", "mus musculus", "--api-url", server.base_url, "--output-path", str(out)]
    assert main([*args, "--max-retries", "1", "--workers", "1"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "2 of 8 datasets ready" in captured.out and "6 failed" in captured.out
    errors = {line.split()[1]: line for line in captured.err.splitlines() if line.strip().startswith("failed")}
    assert "SHA-256 mismatch" in errors["wrong-digest"]
    assert "its sha256 'abc' is not 64 hexadecimal digits" in errors["bad-digest"]
    assert "its size None is not a number of bytes" in errors["no-size"]
    assert "file:///" in errors["local-file"] and "is not an https:// address" in errors["local-file"]
    assert "http://example.org/x.h5ad is not an https:// address" in errors["plain-http"]
    assert "refusing unsafe dataset id 'newline\\n'" in captured.err
    assert sorted(p.parent.name for p in out.glob("*/full.h5ad")) == ["good", "pinned"]
    assert sorted(p.parent.name for p in out.glob("*/" + SUCCESS_MARKER)) == ["good", "pinned"]
    assert not list(out.glob("*/*.part"))  # the file of the wrong digest was discarded
    for name in ["good", "pinned"]:
        assert (out / name / "full.h5ad").read_bytes() == MOUSE and (out / name / SUCCESS_MARKER).is_file()
    # Only the two good assets (and the list) were fetched: nothing refused was ever requested.
    assert sorted(server.paths_requested()) == sorted(
        [DATASETS_ENDPOINT, "/good.h5ad", "/pinned.h5ad", "/wrong-digest.h5ad"]
    )


@pytest.mark.parametrize("api", ["file:///etc", "ftp://127.0.0.1:21"])
def test_api_address_with_another_scheme_fails_at_once(tmp_path, capsys, api):
    args = ["download-data", "--species", "homo sapiens", "--api-url", api, "--output-path", str(tmp_path / "out")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unsupported address scheme" in err and "attempt" not in err
    assert not (tmp_path / "out").exists()


def test_output_path_that_is_a_file_is_one_clear_line(server, tmp_path, capsys):
    """Given by its former name --output-dir (still accepted), the folder is named by its flag --output-path."""
    serve_catalogue(server, [add_dataset(server, "human-a", HUMAN)])
    a_file = tmp_path / "cells.txt"
    a_file.write_text("not a folder")
    argv = ["download-data", "--species", "homo sapiens", "--api-url", server.base_url, "--output-dir", str(a_file)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    message = f"{a_file} is a file, not a folder: choose another --output-path"
    assert err == f"transcriptformer download-data: error: {message}"
    assert a_file.read_text() == "not a folder"


def test_a_dataset_another_run_is_downloading_is_left_to_it(server, tmp_path):
    dataset = add_dataset(server, "held", MOUSE, organisms=(MOUSE_ORGANISM,))
    folder = tmp_path / "out" / "held"
    folder.mkdir(parents=True)
    with FileLock(folder / DOWNLOAD_LOCK):  # as another download-data run holds it
        (outcome,) = download_datasets([dataset], tmp_path / "out", retry=FAST)
    assert outcome.status == "failed" and "being downloaded by another run" in outcome.error
    assert "/held.h5ad" not in server.paths_requested() and not (folder / "full.h5ad").exists()
    (outcome,) = download_datasets([dataset], tmp_path / "out", retry=FAST)  # once it is free
    assert outcome.status == "downloaded" and (folder / "full.h5ad").read_bytes() == MOUSE
