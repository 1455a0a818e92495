"""Bad settings of ``finetune`` and ``train``: one line naming the flag (or override) and the fix, before any work."""

from pathlib import Path

import anndata as ad
import pytest

from conftest import DATA_DIR, REFERENCE_DIR, REFERENCE_INPUT, TRAIN_CONFIG, tiny_train_overrides
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.cli import build_parser, subcommand_parser
from transcriptformer.cli.finetune import config_from_args

FINETUNE = ["finetune", "--checkpoint-path", REFERENCE_DIR, "--train-files", REFERENCE_INPUT, "--device", "cpu"]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--epochs", "0"], ["--epochs must be >= 1, got 0"]),
        (["--task", "classify", "--label-key", "cell_type", "--epochs", "0"], ["--epochs must be >= 1, got 0"]),
        (["--epochs", "-1"], ["--epochs must be >= 1, got -1"]),
        (["--max-steps", "-2"], ["--max-steps must be >= 1 (-1: no limit), got -2"]),
        (["--max-steps", "0"], ["--max-steps must be >= 1"]),
        (["--checkpoint-every-n-steps", "-1"], ["--checkpoint-every-n-steps must be >= 0"]),
        (["--lr", "nan"], ["--lr must be finite and > 0, got nan"]),
        (["--lr", "inf"], ["--lr must be finite and > 0, got inf"]),
        (["--lr", "0"], ["--lr must be > 0"]),
        (["--weight-decay", "-1"], ["--weight-decay must be >= 0"]),
        (["--warmup-steps", "-3"], ["--warmup-steps must be >= 0"]),
        (["--gradient-clip", "nan"], ["--gradient-clip must be finite and >= 0 (0: off), got nan"]),
        (["--early-stopping-patience", "-1"], ["--early-stopping-patience must be >= 0"]),
        (["--val-fraction", "nan"], ["--val-fraction must be finite and >= 0 and < 1, got nan"]),
        (["--num-nodes", "0"], ["--num-nodes must be >= 1"]),
        (["--lora-alpha", "nan"], ["--lora-alpha must be finite and > 0", "got nan"]),
        (["--lora-dropout", "nan"], ["--lora-dropout"]),
        (["--seed", "-1"], ["--seed must be >= 0 and < 4294967296, got -1"]),
        (["--seed", "99999999999"], ["--seed must be >= 0 and < 4294967296"]),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) and value[0].startswith("--") else None,
)
def test_finetune_settings_out_of_range_are_one_line_errors_before_any_work(capsys, tmp_path, flags, words):
    output = tmp_path / "adapters"
    code, err = run_cli(capsys, *FINETUNE, "--output-path", output, *flags)
    assert_one_line_error(code, err, "finetune", *words)
    assert not output.exists()  # refused before the run made its folder


def test_former_flags_of_finetune_still_work():
    """``--devices`` and ``--num-workers``, the former names of ``--device`` and ``--n-data-workers``."""
    parser = subcommand_parser(build_parser(["finetune"]), "finetune")
    base = [str(arg) for arg in FINETUNE[1:]]
    former = config_from_args(parser.parse_args([*base, "--devices", "cpu:2", "--num-workers", "3"]))
    current = config_from_args(parser.parse_args([*base, "--device", "cpu:2", "--n-data-workers", "3"]))
    assert former == current
    assert (current.trainer.device, current.data.n_data_workers) == ("cpu:2", 3)
    assert "--devices" not in parser.format_help() and "--num-workers" not in parser.format_help()


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("optim.lr=nan", ["optim.lr must be finite and > 0, got nan"]),
        ("optim.min_lr_ratio=2", ["optim.min_lr_ratio must be >= 0 and <= 1 (1: no decay), got 2.0"]),
        ("optim.betas=[0.9,1.5]", ["optim.betas[1] must be >= 0 and < 1, got 1.5"]),
        ("optim.betas=[0.9]", ["optim.betas must be two numbers"]),
        ("trainer.max_epochs=-1", ["trainer.max_epochs must be >= 1, got -1"]),
        ("trainer.max_steps=-5", ["trainer.max_steps must be >= 1 (-1: no limit), got -5"]),
        ("trainer.checkpoint_every_n_steps=-1", ["trainer.checkpoint_every_n_steps must be >= 0"]),
        ("trainer.keep_checkpoints=-2", ["trainer.keep_checkpoints must be >= -1"]),
        ("trainer.log_every_n_steps=0", ["trainer.log_every_n_steps must be >= 1"]),
        ("trainer.seed=-1", ["trainer.seed must be >= 0 and < 4294967296"]),
        ("trainer.seed=99999999999", ["trainer.seed must be >= 0 and < 4294967296"]),
        ("data.n_data_workers=-1", ["data.n_data_workers must be >= 0"]),
        ("data.batch_size=0", ["data.batch_size must be >= 1"]),
    ],
)
def test_train_overrides_out_of_range_are_one_line_errors_not_a_complete_dry_run(capsys, tmp_path, override, words):
    output = tmp_path / "model"
    overrides = tiny_train_overrides(output, override)
    code, err = run_cli(capsys, "train", "--config", TRAIN_CONFIG, "--dry-run", *overrides)
    assert_one_line_error(code, err, "train", *words)
    assert not Path(output).exists()


def test_a_label_column_of_120_small_classes_is_named_in_a_short_line(capsys, tmp_path):
    cells = ad.read_h5ad(DATA_DIR / "mouse_brain_1k.h5ad")[:240].copy()
    cells.obs["many"] = [f"type{i % 120}" for i in range(cells.n_obs)]
    cells.write_h5ad(tmp_path / "cells.h5ad")
    demo = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"
    args = ["--checkpoint-path", demo, "--train-files", tmp_path / "cells.h5ad", "--device", "cpu"]
    code, err = run_cli(capsys, "finetune", *args, "--task", "classify", "--label-key", "many", "--output-path",
                        tmp_path / "classifier")  # fmt: skip
    assert_one_line_error(code, err, "finetune", "'many'", "0 class(es) of at least 10 cells", "and 112 more")
    assert len(err.strip().splitlines()[-1]) < 500
    assert not (tmp_path / "classifier").exists()


def test_resume_from_a_missing_or_foreign_checkpoint_is_one_line(capsys, tmp_path):
    output = tmp_path / "adapters"
    code, err = run_cli(capsys, *FINETUNE, "--output-path", output, "--resume", "last")
    assert_one_line_error(code, err, "finetune", "no last.ckpt in", "to resume from")
    assert not output.exists()  # checked before any work
    for text in ("not a checkpoint\n", "root:x:0:0:root:/root:/bin/bash\n"):  # torch fails in two ways on these
        (tmp_path / "notes.txt").write_text(text)
        code, err = run_cli(capsys, *FINETUNE, "--output-path", output, "--resume", tmp_path / "notes.txt")
        assert_one_line_error(code, err, "finetune", "notes.txt", "give --resume a checkpoint that this tool")
    assert not list(output.rglob("adapter_*"))


def test_a_classification_head_too_large_for_memory_is_one_line(capsys, tmp_path):
    demo = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"
    cells = DATA_DIR / "mouse_brain_1k.h5ad"
    args = ["--checkpoint-path", demo, "--train-files", cells, "--device", "cpu", "--task", "classify"]
    code, err = run_cli(capsys, "finetune", *args, "--label-key", "cell_type", "--head-hidden-dim", 10**12,
                        "--output-path", tmp_path / "classifier")  # fmt: skip
    assert_one_line_error(code, err, "finetune", "does not fit in memory", "smaller --head-hidden-dim")
    assert not (tmp_path / "classifier").exists()
