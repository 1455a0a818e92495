"""The training command lines, run as a user would: one subprocess per entry point, the others in this process."""

import csv
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import transcriptformer
from transcriptformer.cli import main
from transcriptformer.model.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, load_adapters

REPO = Path(__file__).parent.parent
REFERENCE = REPO / "test/data/reference_tiny"
CELLS = REFERENCE / "input.h5ad"
BASE = ["--checkpoint-path", str(REFERENCE), "--train-files", str(CELLS)]


def test_python_m_transcriptformer_runs_a_dry_run(tmp_path):
    # `python -m transcriptformer` in a fresh process, as a user runs it; the other commands run in-process.
    flags = "--batch-size 4 --lora-r 4 --device cpu --dry-run --output-path adapters".split()
    command = [sys.executable, "-m", "transcriptformer", "finetune", *BASE, *flags]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "forward and backward passed" in result.stdout
    assert result.stdout.rstrip().endswith("Dry-run complete")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_train_dry_run_from_hydra_config(tmp_path, monkeypatch, capsys):
    overrides = [
        "model_config=tiny",
        "output_path=model",
        f"data.train_files=[{CELLS}]",
        f"data_config.esm2_mappings=[{REFERENCE / 'vocabs/mus_musculus_gene.h5'}]",
        "trainer.device=cpu",
    ]
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(REPO / "conf/train.yaml"), "--dry-run", *overrides]) == 0
    assert capsys.readouterr().out.rstrip().endswith("Dry-run complete")
    assert list(tmp_path.iterdir()) == []


def run_finetune_lora(args: list[str], monkeypatch) -> int:
    """``python finetune_lora.py ARGS`` in this process (test_classify runs the script in a fresh one)."""
    script = str(REPO / "finetune_lora.py")
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name="__main__")
    return exit_info.value.code


def test_documented_reproduction_command_trains_loadable_adapters(tmp_path, monkeypatch, capsys):
    # The command of the documentation, word for word (--devices: the former name of --device), with the reference
    # checkpoint and its 64 real cells.
    flags = "--epochs 1 --batch-size 4 --lora-r 4 --lora-alpha 16 --devices 0 --output-path adapters_epoch1.pt"
    monkeypatch.chdir(tmp_path)
    assert run_finetune_lora([*BASE, *flags.split()], monkeypatch) == 0
    adapters = tmp_path / "adapters_epoch1.pt"
    assert capsys.readouterr().out.splitlines()[-1] == f"Output: {adapters.resolve()}"
    assert (adapters / ADAPTER_CONFIG_FILE).is_file()
    weights = load_file(adapters / ADAPTER_WEIGHTS_FILE)
    assert {tuple(w.shape) for k, w in weights.items() if "lora_A" in k} == {(4, 64), (4, 128)}
    metrics = (adapters / "training_run" / "metrics.csv").read_text().splitlines()
    assert metrics[-1].startswith(",0,15,")  # 64 cells / batch 4 = 16 steps; the last row is the epoch's mean
    model = transcriptformer.load(REFERENCE, device="cpu")
    assert load_adapters(model.model, adapters) is model.model  # merged into the loaded model

    merged = tmp_path / "merged"
    merge = ["merge-adapters", "--checkpoint-path", str(REFERENCE), "--adapter", str(adapters), "--output-path"]
    capsys.readouterr()
    assert main([*merge, str(merged)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"Output: {merged.resolve()}"
    assert transcriptformer.load(merged, device="cpu").predict(CELLS, batch_size=32, output_keys=["llh"])[
        "llh"
    ].shape == (64,)
    assert main(["finetune", *BASE, "--output-path", str(adapters)]) == 1  # adapters are never overwritten


def test_finetune_reports_bad_input(tmp_path, capsys):
    missing = ["--checkpoint-path", str(tmp_path / "missing"), "--train-files", str(CELLS), "--dry-run"]
    assert main(["finetune", *missing]) == 1
    assert "missing': no such checkpoint folder" in capsys.readouterr().err
    assert main(["finetune", *BASE, "--lora-target-modules", "qkv", "--dry-run"]) == 1
    assert "'qkv' matches no linear layer" in capsys.readouterr().err
    assert main(["finetune", *BASE]) == 1
    assert "--output-path is required" in capsys.readouterr().err


@pytest.mark.slow  # two training processes (20-32 s)
def test_finetune_in_two_processes_with_ddp(tmp_path):
    # The DDP code path of --device N GPUs, run with two CPU processes (gloo): the cells are split between them.
    flags = "--epochs 1 --batch-size 4 --lora-r 4 --device cpu:2 --output-path adapters".split()
    command = [sys.executable, "-m", "transcriptformer", "finetune", *BASE, *flags]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "adapters" / "training_run" / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert (last["epoch"], last["step"]) == ("0", "7")  # 64 cells / 2 processes / batch 4 = 8 steps each
    model = load_adapters(transcriptformer.load(REFERENCE, device="cpu").model, tmp_path / "adapters")
    assert all(torch.isfinite(p).all() for p in model.parameters())
