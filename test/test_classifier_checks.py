"""Hand-edited or foreign classifier heads in ``predict-labels``: one line before any compute, no output.

The classifier folder is made as ``finetune --task classify`` saves it (adapters of the demo model, a head, its
``classifier.json`` with the SHA-256 of both weights files), untrained: what is checked here is the files.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DATA_DIR, assert_no_output
from test_generate import DEMO_MODEL
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.config import WEIGHTS_FILE
from transcriptformer.model.classifier import (
    CLASSIFIER_CONFIG_FILE,
    CLASSIFIER_WEIGHTS_FILE,
    ClassifierHead,
    ClassifierInfo,
    save_classifier,
)
from transcriptformer.model.lora import ADAPTER_WEIGHTS_FILE, add_lora_adapters, save_adapters
from transcriptformer.safe_load import sha256_of
from transcriptformer.training.config import LoraConfig

CELLS = DATA_DIR / "demo_mouse_brain_heldout.h5ad"
EMBED_DIM = 128  # the demo model's


def make_classifier(folder: Path, classes: list[str], embed_dim: int = EMBED_DIM, hidden_dim: int = 0) -> Path:
    torch.manual_seed(0)
    model = add_lora_adapters(load_checkpoint(DEMO_MODEL).model, LoraConfig(r=2), str(DEMO_MODEL))
    save_adapters(model, folder)
    info = ClassifierInfo(
        label_key="cell_type",
        classes=classes,
        embed_dim=embed_dim,
        hidden_dim=hidden_dim,
        base_checkpoint=str(DEMO_MODEL),
        base_weights_sha256=sha256_of(DEMO_MODEL / WEIGHTS_FILE),
        adapter_sha256=sha256_of(folder / ADAPTER_WEIGHTS_FILE),
    )
    return save_classifier(ClassifierHead(embed_dim, len(classes), hidden_dim), info, folder)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("classifier") / "clf", ["astrocyte", "neuron", "oligodendrocyte"])


def predict(capsys, adapter: Path, output: Path) -> tuple[int, str]:
    return run_cli(capsys, "predict-labels", "--checkpoint-path", DEMO_MODEL, "--adapter", adapter,
                   "--data-file", CELLS, "--output-path", output)  # fmt: skip


def edited(classifier: Path, folder: Path, **changes) -> Path:
    copy = shutil.copytree(classifier, folder / "edited")
    info = json.loads((copy / CLASSIFIER_CONFIG_FILE).read_text())
    (copy / CLASSIFIER_CONFIG_FILE).write_text(json.dumps(info | changes))
    return copy


def test_an_untouched_classifier_labels_the_cells(tmp_path, capsys, classifier):
    code, err = predict(capsys, classifier, tmp_path / "out")
    assert code == 0, err
    assert list((tmp_path / "out").glob("*.h5ad"))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"embed_dim": -1}, ["embed_dim must be >= 1", "-1"]),
        ({"embed_dim": "128"}, ["embed_dim must be an integer", "'128'"]),
        ({"embed_dim": True}, ["embed_dim must be an integer"]),
        ({"hidden_dim": -3}, ["hidden_dim must be >= 0"]),
        ({"hidden_dim": 1.5}, ["hidden_dim must be an integer"]),
        ({"classes": [1, 2, 3]}, ["classes must be a list of strings"]),
        ({"classes": ["neuron", "neuron", "astrocyte"]}, ["classes names ['neuron'] more than once"]),
        ({"classes": ["neuron"]}, ["at least 2 classes"]),
        ({"label_key": "cell/type"}, ["label_key", "without '/'"]),
        ({"label_key": 7}, ["label_key must be a string"]),
        ({"embed_dim": 64}, ["width 64", "width 128", "another model"]),
        ({"hidden_dim": 10**12}, ["does not fit", "1000000000000"]),  # checked without allocating the head
    ],
)
def test_edited_classifier_descriptions_are_one_line_errors(tmp_path, capsys, classifier, changes, words):
    output = tmp_path / "out"
    code, err = predict(capsys, edited(classifier, tmp_path, **changes), output)
    assert_one_line_error(
        code, err, "predict-labels", CLASSIFIER_CONFIG_FILE if "width" not in words[0] else "", *words
    )
    assert_no_output(output)


def test_a_head_of_another_width_is_refused(tmp_path, capsys):
    """A head file and classifier.json that agree with each other, for embeddings of another width."""
    folder = make_classifier(tmp_path / "narrow", ["astrocyte", "neuron"], embed_dim=64)
    code, err = predict(capsys, folder, tmp_path / "out")
    assert_one_line_error(code, err, "predict-labels", "width 64", "width 128")
    assert_no_output(tmp_path / "out")


def test_a_head_with_nan_weights_is_refused(tmp_path, capsys, classifier):
    copy = shutil.copytree(classifier, tmp_path / "nan")
    weights = copy / CLASSIFIER_WEIGHTS_FILE
    tensors = load_file(weights)
    tensors["layers.0.bias"][1] = float("nan")
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, weights, metadata=metadata)
    code, err = predict(capsys, copy, tmp_path / "out")
    assert_one_line_error(code, err, "predict-labels", "NaN or infinite")
    assert_no_output(tmp_path / "out")


def test_a_long_class_list_is_shortened_in_the_error(tmp_path, capsys):
    folder = make_classifier(tmp_path / "many", [f"type_{i}" for i in range(120)])
    info = json.loads((folder / CLASSIFIER_CONFIG_FILE).read_text())
    info["classes"] = [f"kind_{i}" for i in range(120)]  # another label set than the head's
    (folder / CLASSIFIER_CONFIG_FILE).write_text(json.dumps(info))
    code, err = predict(capsys, folder, tmp_path / "out")
    assert_one_line_error(code, err, "predict-labels", "(120 in all)", "different runs")
    assert "type_50" not in err and len(err) < 600
