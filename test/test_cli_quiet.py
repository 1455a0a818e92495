"""Quiet, consistent, helpful: what the commands print and how they write files.

--quiet / --verbose, third-party noise, precision advice, usage errors, help defaults, and the permissions and model
card of saved adapters.
"""

import argparse
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import transcriptformer
from conftest import REFERENCE_DIR, REFERENCE_INPUT, TRAIN_CONFIG, tiny_train_overrides
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.cli import COMMANDS, build_parser, main, subcommand_parser
from transcriptformer.data.vocab import write_embedding_table
from transcriptformer.model.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MODEL_CARD_FILE,
    LoraConfig,
    add_lora_adapters,
    save_adapters,
)

LIGHTNING_NOISE = ("GPU available", "TPU available", "💡", "litlogger", "litmodels", "deprecated")
SLOW_PRECISION = "warning: precision 16-mixed on the CPU is several times slower than 32"
FINETUNE = ["finetune", "--checkpoint-path", str(REFERENCE_DIR), "--train-files", str(REFERENCE_INPUT)]


def run_cli(args: list[str], cwd: Path, umask: int = 0o022) -> subprocess.CompletedProcess:
    """The command in a fresh process, as a user runs it.

    What Lightning prints depends on the process: its loggers get their own handler on the real stderr when it is
    imported where no logging is set up, as in a command's process but not in a test's, where capture and logging
    plugins are in place. The tests of that output run the command apart, the others through ``main``.
    """
    return subprocess.run(
        [sys.executable, "-m", "transcriptformer", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(umask),
    )


def inference(tmp_path: Path, *flags: str) -> list[str]:
    return [
        "inference",
        "--checkpoint-path",
        str(REFERENCE_DIR),
        "--data-file",
        str(REFERENCE_INPUT),
        "--output-keys",
        "embeddings",
        "--output-path",
        str(tmp_path),
        *flags,
    ]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_takes_quiet_and_verbose(name, capsys):
    parser = build_parser([name])
    help_text = subcommand_parser(parser, name).format_help()
    assert "--quiet" in help_text and "--verbose" in help_text
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([name, "--quiet", "--verbose"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_quiet_inference_prints_only_the_output(tmp_path, capsys):
    assert main(inference(tmp_path, "--quiet")) == 0
    captured = capsys.readouterr()
    assert captured.out == f"Output: {(tmp_path / 'embeddings.h5ad').resolve()}\n"
    assert captured.err == ""
    assert main(inference(tmp_path, "--overwrite")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Running 64 cells") and out[-1] == f"Output: {(tmp_path / 'embeddings.h5ad').resolve()}"


def test_16_mixed_on_cpu_warns_once_and_names_the_alternatives(tmp_path, capsys):
    # several chunks, so several batch loops: still one warning, on one line
    assert main(inference(tmp_path, "--precision", "16-mixed", "--chunk-size", "20", "--quiet")) == 0
    err = capsys.readouterr().err
    assert err.count(SLOW_PRECISION) == 1, err
    assert err.startswith("transcriptformer inference: warning:") and "--precision 32, or bf16-mixed" in err
    assert len(err.splitlines()) == 1
    with pytest.warns(UserWarning, match="16-mixed on the CPU is several times slower"):
        transcriptformer.load(REFERENCE_DIR, device="cpu").embed(REFERENCE_INPUT, precision="16-mixed")


def test_unknown_flag_shows_the_subcommand_usage(capsys):
    argv = ["inference", "--checkpoint-path", "ckpt", "--data-file", "cells.h5ad", "--bogus", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: transcriptformer inference ")
    assert "transcriptformer inference: error: unrecognized arguments: --bogus 1" in err
    with pytest.raises(SystemExit):
        main(["doctor", "--skip-flexx"])
    assert "transcriptformer doctor: error: unrecognized arguments: --skip-flexx" in capsys.readouterr().err


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_every_default(name):
    parser = subcommand_parser(build_parser([name]), name)
    for action in parser._actions:
        takes_value = action.option_strings and action.nargs != 0
        empty = action.default in (None, argparse.SUPPRESS, [])  # nothing unless given
        if takes_value and not empty:
            assert "%(default)s" in (action.help or ""), f"{name} {action.option_strings[0]}: {action.help}"
    assert "%(" not in parser.format_help()  # every placeholder is filled


def test_saved_files_follow_the_umask(tmp_path):
    model = add_lora_adapters(load_checkpoint(REFERENCE_DIR).model, LoraConfig(r=4), str(REFERENCE_DIR))
    previous = os.umask(0o027)
    try:
        adapters = save_adapters(model, tmp_path / "adapters")
        write_embedding_table(tmp_path / "new_species_gene.h5", {"GENE1": np.ones(4)})
    finally:
        os.umask(previous)
    for path in (adapters / name for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MODEL_CARD_FILE)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path.name
    assert stat.S_IMODE((tmp_path / "new_species_gene.h5").stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "new_species_gene.h5"]  # no temporary left


def test_finetune_is_quiet_by_default_and_writes_a_model_card(tmp_path):
    flags = ["--max-steps", "2", "--batch-size", "8", "--lora-r", "4", "--device", "cpu", "--output-path", "adapters"]
    result = run_cli([*FINETUNE, *flags, "--precision", "16-mixed"], cwd=tmp_path, umask=0o002)
    assert result.returncode == 0, result.stderr
    assert not [noise for noise in LIGHTNING_NOISE if noise in result.stderr], result.stderr
    assert result.stderr.count(SLOW_PRECISION) == 1  # and float16 trained on the CPU, as asked
    assert result.stdout.splitlines()[-1] == f"Output: {(tmp_path / 'adapters').resolve()}"
    adapters = tmp_path / "adapters"
    files = [name for name in os.listdir(adapters) if "." in name and not name.startswith(".")]  # not the lock
    modes = {name: stat.S_IMODE((adapters / name).stat().st_mode) for name in files}
    assert modes == {ADAPTER_CONFIG_FILE: 0o664, ADAPTER_WEIGHTS_FILE: 0o664, MODEL_CARD_FILE: 0o664}
    card = (adapters / MODEL_CARD_FILE).read_text()
    assert "More Information Needed" not in card
    assert f"Adapters of the base checkpoint `{REFERENCE_DIR}`" in card
    assert "| rank `r` | 4 |" in card and "| `lora_alpha` | 16.0 |" in card
    assert f"--checkpoint-path {REFERENCE_DIR} --adapter adapters --data-file" in card  # paths as given


def test_verbose_shows_lightning_logs_and_quiet_only_the_result(tmp_path):
    flags = ["--max-steps", "1", "--batch-size", "8", "--lora-r", "4", "--device", "cpu", "--output-path", "adapters"]
    verbose = run_cli([*FINETUNE, *flags, "--verbose"], cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr
    assert "GPU available: False, used: False" in verbose.stderr

    train = ["train", "--quiet", "--config", str(TRAIN_CONFIG)]
    quiet = run_cli([*train, *tiny_train_overrides(tmp_path / "model", "trainer.max_steps=1")], cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == f"Output: {(tmp_path / 'model').resolve()}\n"
    assert not [noise for noise in LIGHTNING_NOISE if noise in quiet.stderr], quiet.stderr


def test_progress_bars_are_labelled_with_the_command():
    from transcriptformer.console import progress_bar, verbosity

    stream = io.StringIO()
    with (
        verbosity("normal", "transcriptformer predict-labels"),
        progress_bar(total=2, desc="classify", file=stream) as bar,
    ):
        bar.update(2)
    assert stream.getvalue().splitlines()[-1].strip().startswith("transcriptformer predict-labels: classify: 100%")
    with progress_bar(total=1, file=stream) as bar:  # outside a command: the package's name
        assert bar.desc.startswith("transcriptformer")
