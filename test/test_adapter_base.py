"""Adapters know their base checkpoint; merge-adapters never replaces it.

``finetune`` records the SHA-256 of the base checkpoint's weights file in the adapter weights' metadata;
``inference --adapter``, ``merge-adapters`` and ``predict-labels`` refuse adapters of another checkpoint of the same
shape (which load without error otherwise, and give wrong outputs), and load older adapters without the record with
a warning. ``merge-adapters`` refuses to write over the base checkpoint it reads.
"""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import REFERENCE_DIR, REFERENCE_INPUT, assert_no_output
from test_adapter_checks import trained_adapters
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.checkpoint import VOCAB_DIR, load_checkpoint, save_checkpoint
from transcriptformer.cli import main
from transcriptformer.config import CONFIG_FILE, WEIGHTS_FILE
from transcriptformer.model.classifier import ClassifierHead, ClassifierInfo, save_classifier
from transcriptformer.model.lora import ADAPTER_WEIGHTS_FILE, BASE_WEIGHTS_KEY
from transcriptformer.safe_load import sha256_of

FINETUNE = ["finetune", "--checkpoint-path", REFERENCE_DIR, "--train-files", REFERENCE_INPUT, "--device", "cpu"]
SHORT = ["--max-steps", "1", "--batch-size", "8", "--lora-r", "2", "--quiet"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    """Adapters of the reference checkpoint, trained for one step by ``finetune``."""
    output = tmp_path_factory.mktemp("finetune") / "adapters"
    assert main([str(arg) for arg in [*FINETUNE, *SHORT, "--output-path", output]]) == 0
    return output


@pytest.fixture(scope="module")
def look_alike(tmp_path_factory) -> Path:
    """A checkpoint of the reference's shape whose weights differ a little (another training run, say)."""
    checkpoint = load_checkpoint(REFERENCE_DIR)
    with torch.no_grad():
        next(checkpoint.model.parameters()).add_(0.01)
    gene_files = [REFERENCE_DIR / VOCAB_DIR / name for name in checkpoint.config.data_config.esm2_mappings]
    folder = tmp_path_factory.mktemp("other") / "look_alike"
    return save_checkpoint(folder, checkpoint.config, checkpoint.model, checkpoint.aux_vocabs, gene_files)


def with_a_classifier(adapters: Path, folder: Path) -> Path:
    """A copy of ``adapters`` with an (untrained) classification head, as ``finetune --task classify`` saves it."""
    folder = shutil.copytree(adapters, folder)
    embed_dim = load_checkpoint(REFERENCE_DIR).config.model_config.embed_dim
    info = ClassifierInfo(
        label_key="cell_type",
        classes=["a", "b"],
        embed_dim=embed_dim,
        hidden_dim=0,
        base_checkpoint=str(REFERENCE_DIR),
        base_weights_sha256=sha256_of(REFERENCE_DIR / WEIGHTS_FILE),
        adapter_sha256=sha256_of(folder / ADAPTER_WEIGHTS_FILE),
    )
    return save_classifier(ClassifierHead(embed_dim, 2), info, folder)


def test_finetune_records_the_base_weights(adapters):
    with safe_open(adapters / ADAPTER_WEIGHTS_FILE, "pt") as file:
        assert file.metadata()[BASE_WEIGHTS_KEY] == sha256_of(REFERENCE_DIR / WEIGHTS_FILE)


@pytest.mark.parametrize("command", ["inference", "merge-adapters", "predict-labels"])
def test_adapters_on_another_checkpoint_of_the_same_shape_are_one_line(capsys, tmp_path, adapters, look_alike, command):
    output = tmp_path / "out"
    adapter = with_a_classifier(adapters, tmp_path / "classifier") if command == "predict-labels" else adapters
    args = ["--checkpoint-path", look_alike, "--adapter", adapter, "--output-path", output]
    if command != "merge-adapters":
        args += ["--data-file", REFERENCE_INPUT]
    code, err = run_cli(capsys, command, *args)
    assert_one_line_error(code, err, command, f"trained on the checkpoint {REFERENCE_DIR}", f"not on {look_alike}")
    assert "--checkpoint-path" in err
    assert_no_output(output)
    assert not (output / CONFIG_FILE).exists()


def test_adapters_without_the_record_load_with_a_warning(tmp_path, capsys):
    older = trained_adapters(REFERENCE_DIR, tmp_path / "older")  # saved as older versions did: no record
    with pytest.warns(UserWarning, match="do not record the checkpoint they were trained on"):
        load_checkpoint(REFERENCE_DIR, adapter=older)
    assert main(["merge-adapters", "--checkpoint-path", str(REFERENCE_DIR), "--adapter", str(older),
                 "--output-path", str(tmp_path / "merged")]) == 0  # fmt: skip
    assert "do not record the checkpoint" in capsys.readouterr().err


def test_merging_into_the_base_checkpoint_itself_is_refused_and_keeps_it(capsys, tmp_path, adapters):
    base = shutil.copytree(REFERENCE_DIR, tmp_path / "base")
    before = {path.name: path.read_bytes() for path in base.rglob("*") if path.is_file()}
    trained = shutil.copytree(adapters, tmp_path / "adapters")
    for output in (base, tmp_path / "." / "base"):
        code, err = run_cli(capsys, "merge-adapters", "--checkpoint-path", base, "--adapter", trained,
                            "--output-path", output, "--overwrite")  # fmt: skip
        assert_one_line_error(code, err, "merge-adapters", "is the base checkpoint itself", "another --output-path")
    assert {path.name: path.read_bytes() for path in base.rglob("*") if path.is_file()} == before


def test_merge_replaces_another_checkpoint_as_one_unit(capsys, tmp_path, adapters):
    output = tmp_path / "merged"
    args = ["merge-adapters", "--checkpoint-path", REFERENCE_DIR, "--adapter", adapters, "--output-path", output]
    assert main([str(arg) for arg in args]) == 0
    code, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "merge-adapters", "already holds a checkpoint", "--overwrite")
    (output / VOCAB_DIR / "stale.h5").write_text("an earlier run's table")
    assert main([str(arg) for arg in [*args, "--overwrite"]]) == 0
    assert not (output / VOCAB_DIR / "stale.h5").exists()  # the checkpoint is the new one only
    assert not list(output.glob(".partial-*"))
    merged = load_checkpoint(output)
    assert {path.name for path in output.iterdir() if not path.name.startswith(".")} == {
        CONFIG_FILE,
        WEIGHTS_FILE,
        VOCAB_DIR,
    }
    assert list(merged.gene_vocab.index) == list(load_checkpoint(REFERENCE_DIR).gene_vocab.index)
