"""Foreign, edited or non-finite LoRA adapters in ``merge-adapters`` and ``inference --adapter``: one line, no output.

Every case starts from real adapters of the reference checkpoint (or of the demo model) and changes what a user's
hand, another tool or another model would: the ``adapter_config.json`` settings, the weights' rank or width.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REFERENCE_DIR, REFERENCE_INPUT, assert_no_output
from test_generate import DEMO_MODEL
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.config import WEIGHTS_FILE
from transcriptformer.model.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, add_lora_adapters, save_adapters
from transcriptformer.training.config import LoraConfig


def trained_adapters(base: Path, folder: Path, **settings) -> Path:
    """Adapters of ``base`` whose update is not zero (fresh adapters are an exact identity)."""
    torch.manual_seed(0)
    model = add_lora_adapters(load_checkpoint(base).model, LoraConfig(r=4, **settings), str(base))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return save_adapters(model, folder)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return trained_adapters(REFERENCE_DIR, tmp_path_factory.mktemp("adapters") / "adapter", train_heads=True)


def edited(adapter: Path, folder: Path, **changes) -> Path:
    """A copy of ``adapter`` whose adapter_config.json has ``changes``."""
    copy = shutil.copytree(adapter, folder / "edited")
    config = json.loads((copy / ADAPTER_CONFIG_FILE).read_text())
    (copy / ADAPTER_CONFIG_FILE).write_text(json.dumps(config | changes))
    return copy


def merge(capsys, adapter: Path, output: Path) -> tuple[int, str]:
    return run_cli(capsys, "merge-adapters", "--checkpoint-path", REFERENCE_DIR, "--adapter", adapter,
                   "--output-path", output)  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"lora_alpha": float("nan")}, ["lora_alpha", "finite", "nan"]),
        ({"lora_alpha": -16}, ["lora_alpha", "> 0"]),
        ({"r": 0}, ["r must be", ">= 1"]),
        ({"r": "4"}, ["r must be a whole number"]),
        ({"lora_dropout": 1.5}, ["lora_dropout", "< 1"]),
        ({"init_lora_weights": "pissa"}, ["init_lora_weights 'pissa'", "rewrite the base weights"]),
        ({"init_lora_weights": "olora"}, ["init_lora_weights 'olora'"]),
        ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, ["init_lora_weights 'loftq'"]),
        ({"init_lora_weights": "eva"}, ["init_lora_weights 'eva'"]),
        ({"init_lora_weights": "corda"}, ["init_lora_weights 'corda'"]),
        ({"peft_type": "PREFIX_TUNING"}, ["peft_type 'PREFIX_TUNING'", "only LoRA"]),
        ({"peft_type": "IA3"}, ["peft_type 'IA3'"]),
        ({"use_dora": True}, ["use_dora=True", "finetune"]),
        ({"use_rslora": True}, ["use_rslora=True"]),
        ({"rank_pattern": {"linear1": 2}}, ["rank_pattern"]),
        ({"layers_to_transform": [0]}, ["layers_to_transform"]),
        ({"an_option_of_a_newer_peft": "on"}, ["an_option_of_a_newer_peft"]),
        ({"target_modules": ".*linear1"}, ["target_modules", "list of module names"]),
        ({"target_modules": ["no_such_layer"]}, ["'no_such_layer'", "another model"]),
        ({"modules_to_save": ["transformer_encoder"]}, ["modules_to_save", "'transformer_encoder'"]),
        ({"r": 8}, ["rank [4]", "r=8"]),
        ({"lora_alpha": 1e308}, ["NaN or infinite", "overflows", "lora_alpha"]),
    ],
)
def test_merge_refuses_edited_adapter_configs(tmp_path, capsys, adapter, changes, words):
    output = tmp_path / "merged"
    code, err = merge(capsys, edited(adapter, tmp_path, **changes), output)
    assert_one_line_error(code, err, "merge-adapters", *words)
    assert not (output / WEIGHTS_FILE).exists()


def test_inference_refuses_pissa_adapters_before_changing_anything(tmp_path, capsys, adapter):
    output = tmp_path / "out"
    pissa = edited(adapter, tmp_path, init_lora_weights="pissa_niter_4")
    code, err = run_cli(capsys, "inference", "--checkpoint-path", REFERENCE_DIR, "--data-file", REFERENCE_INPUT,
                        "--adapter", pissa, "--output-path", output)  # fmt: skip
    assert_one_line_error(code, err, "inference", "init_lora_weights 'pissa_niter_4'")
    assert_no_output(output)


def test_adapters_of_another_model_are_refused(tmp_path, capsys):
    """Adapters of the demo model (4 layers of width 128) on the reference checkpoint (2 layers of width 64)."""
    foreign = trained_adapters(DEMO_MODEL, tmp_path / "demo_adapter")
    output = tmp_path / "out"
    code, err = run_cli(capsys, "inference", "--checkpoint-path", REFERENCE_DIR, "--data-file", REFERENCE_INPUT,
                        "--adapter", foreign, "--output-path", output)  # fmt: skip
    assert_one_line_error(code, err, "inference", "a layer this model does not have", "another model")
    assert_no_output(output)

    # The same adapters cut to the reference's two layers: the layers exist, but their width differs.
    tensors = load_file(foreign / ADAPTER_WEIGHTS_FILE)
    kept = {key: value for key, value in tensors.items() if ".encoder_layers.2." not in key and ".3." not in key}
    save_file(kept, foreign / ADAPTER_WEIGHTS_FILE)
    code, err = merge(capsys, foreign, tmp_path / "merged")
    assert_one_line_error(code, err, "merge-adapters", "where the model needs (4, 64)", "another model")
    assert not (tmp_path / "merged" / WEIGHTS_FILE).exists()


def test_adapter_weights_missing_a_targeted_layer_are_refused(tmp_path, capsys, adapter):
    """Without the check, peft leaves such a layer's fresh (identity) adapter in place: a silent partial merge."""
    copy = shutil.copytree(adapter, tmp_path / "partial")
    tensors = load_file(copy / ADAPTER_WEIGHTS_FILE)
    save_file(
        {key: value for key, value in tensors.items() if "linear2.lora_B" not in key}, copy / ADAPTER_WEIGHTS_FILE
    )
    code, err = merge(capsys, copy, tmp_path / "merged")
    assert_one_line_error(code, err, "merge-adapters", "lacks 2 of the", "linear2.lora_B")


def test_lora_settings_are_range_checked_under_their_flag_names(tmp_path, capsys):
    for flag, value, words in [("--lora-alpha", "nan", ["--lora-alpha", "finite"]),
                               ("--lora-dropout", "1", ["--lora-dropout", "< 1"])]:  # fmt: skip
        code, err = run_cli(capsys, "finetune", "--checkpoint-path", REFERENCE_DIR, "--train-files", REFERENCE_INPUT,
                            "--output-path", tmp_path / "adapters", flag, value)  # fmt: skip
        assert_one_line_error(code, err, "finetune", *words)
        assert not (tmp_path / "adapters" / ADAPTER_WEIGHTS_FILE).exists()
