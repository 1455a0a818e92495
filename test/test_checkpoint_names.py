"""Every command that takes ``--checkpoint-path`` takes a folder or a published name, resolved by one function.

The published archive is the demo checkpoint packed as ``tf_sapiens/``, served by a local HTTP server for the first
command; every later command reads it from the cache with the server gone.
"""

from pathlib import Path

import anndata as ad
import pytest

from conftest import DATA_DIR
from local_http_server import LocalServer
from test_download import tar_gz
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.cli import main
from transcriptformer.hub.artifacts import BASE_URL_ENV
from transcriptformer.hub.cache import CACHE_ENV

DEMO = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"
HELDOUT = DATA_DIR / "demo_mouse_brain_heldout.h5ad"
ASTROCYTES = ["--obs-filter", "cell_type == 'astrocyte'"]


def commands(out: Path, name: str) -> dict[str, list[str]]:
    """Each command that loads a checkpoint, run small on the held-out cells with ``--checkpoint-path name``."""
    cells = ["--checkpoint-path", name, "--data-file", str(HELDOUT)]
    train = ["--checkpoint-path", name, "--train-files", str(HELDOUT), "--device", "cpu", "--max-steps", "1"]
    return {
        "inference": ["inference", *cells, "--output-path", str(out / "inference")],
        "score": ["score", *cells, "--output-path", str(out / "score")],
        "generate": ["generate", *cells, "--num-cells", "2", "--max-genes", "8", "--output-path", str(out / "gen")],
        "perturb": ["perturb", *cells, *ASTROCYTES, "--knock-out", "Gad2", "--output-path", str(out / "perturb")],
        "screen": [
            "screen",
            *cells,
            *ASTROCYTES,
            "--knock-out",
            "all",
            "--max-genes-per-cell",
            "2",
            "--null-bins",
            "2",
            "--output-path",
            str(out / "screen"),
        ],  # fmt: skip
        "finetune": ["finetune", *train, "--lora-r", "2", "--output-path", str(out / "adapters")],
        "finetune-classify": [
            "finetune",
            *train,
            "--task",
            "classify",
            "--label-key",
            "cell_type",
            "--head-hidden-dim",
            "8",
            "--output-path",
            str(out / "classifier"),
        ],  # fmt: skip
        "merge-adapters": [
            "merge-adapters",
            "--checkpoint-path",
            name,
            "--adapter",
            str(out / "adapters"),
            "--output-path",
            str(out / "merged"),
        ],  # fmt: skip
        "predict-labels": [
            "predict-labels",
            *cells,
            "--adapter",
            str(out / "classifier"),
            "--output-path",
            str(out / "labels"),
        ],  # fmt: skip
        "annotate": [
            "annotate",
            *cells,
            "--reference",
            str(HELDOUT),
            "--label-key",
            "cell_type",
            "--no-figures",
            "--output-path",
            str(out / "annotate"),
        ],  # fmt: skip
        "evaluate": [
            "evaluate",
            "--data-file",
            str(HELDOUT),
            "--label-key",
            "cell_type",
            "--checkpoint-path",
            name,
            "--output-path",
            str(out / "evaluate"),
        ],  # fmt: skip
        "genes": ["genes", "--checkpoint-path", name, "--search", "gad"],
    }


@pytest.fixture
def published_demo(tmp_path, monkeypatch) -> LocalServer:
    """The demo checkpoint served as ``tf-sapiens``; the cache in ``tmp_path``."""
    archive = tar_gz(lambda tar: tar.add(DEMO, arcname="tf_sapiens"))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    with LocalServer() as server:
        server.add("/tf_sapiens.tar.gz", archive)
        monkeypatch.setenv(BASE_URL_ENV, server.base_url)
        yield server


@pytest.mark.slow
def test_every_command_takes_a_published_name(published_demo, tmp_path, capsys):
    runs = commands(tmp_path / "out", "tf-sapiens")
    assert main([*runs.pop("inference"), "-q"]) == 0  # downloads into the cache
    assert published_demo.paths_requested() == ["/tf_sapiens.tar.gz"]
    published_demo.files.clear()  # from here on, the cache alone
    for name, argv in runs.items():
        assert main([*argv, "-q"]) == 0, name
    assert published_demo.paths_requested() == ["/tf_sapiens.tar.gz"]
    embedded = ad.read_h5ad(next((tmp_path / "out" / "inference").glob("*.h5ad")))
    recorded = embedded.uns["transcriptformer"]["checkpoint_path"]
    assert recorded == str((tmp_path / "cache" / "tf_sapiens").resolve())
    assert (tmp_path / "out" / "merged" / "model_weights.pt").is_file()
    assert "Gad2" in capsys.readouterr().out


@pytest.mark.parametrize("command", list(commands(Path("out"), "x")))
@pytest.mark.parametrize(
    ("name", "words"),
    [
        (
            "tf-sapien",
            ["'tf-sapien': no such checkpoint folder, and not a published model", "did you mean 'tf-sapiens'"],
        ),
        ("no/such/folder", ["'no/such/folder': no such checkpoint folder"]),
    ],
)
def test_a_missing_folder_or_unknown_name_is_one_line(tmp_path, capsys, monkeypatch, command, name, words):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    argv = commands(tmp_path / "out", name)[command]
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(
        code, err, argv[0], *words, "tf-sapiens, tf-exemplar, tf-metazoa", "transcriptformer download"
    )
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
