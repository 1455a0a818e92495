"""What ``finetune`` writes: never a file it did not write without ``--overwrite``, and adapters as one unit."""

import json
import os

import pytest

import transcriptformer
from conftest import REFERENCE_DIR, REFERENCE_INPUT
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.cli import main
from transcriptformer.model.classifier import CLASSIFIER_CONFIG_FILE, CLASSIFIER_WEIGHTS_FILE
from transcriptformer.model.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MODEL_CARD_FILE

FINETUNE = ["finetune", "--checkpoint-path", REFERENCE_DIR, "--train-files", REFERENCE_INPUT, "--device", "cpu"]
SHORT = ["--max-steps", "1", "--batch-size", "8", "--lora-r", "2"]


def test_a_readme_in_the_output_folder_is_kept_and_nothing_is_trained(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --output-path .: a project folder with its own README
    (tmp_path / MODEL_CARD_FILE).write_text("# my project\n")
    code, err = run_cli(capsys, *FINETUNE, *SHORT, "--output-path", ".")
    assert_one_line_error(code, err, "finetune", "already holds", "README.md", "--overwrite", "another --output-path")
    assert (tmp_path / MODEL_CARD_FILE).read_text() == "# my project\n"
    assert sorted(os.listdir(tmp_path)) == [MODEL_CARD_FILE]  # refused before training: no run folder, no lock


def test_overwrite_replaces_a_classifier_with_adapters_as_one_set(capsys, tmp_path):
    output = tmp_path / "adapters"
    output.mkdir()
    for name in (MODEL_CARD_FILE, CLASSIFIER_CONFIG_FILE, CLASSIFIER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE):
        (output / name).write_text("{}")  # an earlier run's files
    code, err = run_cli(capsys, *FINETUNE, *SHORT, "--output-path", output)
    assert_one_line_error(code, err, "finetune", "already holds", "README.md", "classifier.json", "--overwrite")
    assert main([str(arg) for arg in [*FINETUNE, *SHORT, "--output-path", output, "--overwrite", "-q"]]) == 0
    files = {path.name for path in output.iterdir() if not path.name.startswith(".")}  # the lock file stays
    assert files == {MODEL_CARD_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, "training_run"}  # no stale head
    assert json.loads((output / ADAPTER_CONFIG_FILE).read_text())["r"] == 2
    assert f"--adapter {output} " in (output / MODEL_CARD_FILE).read_text()  # the card names the final folder
    assert not list(output.glob(".partial-*"))
    transcriptformer.load(REFERENCE_DIR, device="cpu", adapter=output)  # loads


@pytest.mark.parametrize("output", ["adapters.pt", "file"])
def test_an_output_path_that_is_a_file_is_refused(capsys, tmp_path, output):
    (tmp_path / output).write_text("not a folder")
    code, err = run_cli(capsys, *FINETUNE, *SHORT, "--output-path", tmp_path / output)
    assert_one_line_error(code, err, "finetune", "is a file", "give a folder")
    assert (tmp_path / output).read_text() == "not a folder"
