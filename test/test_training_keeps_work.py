"""Training never loses work: short runs validate and save, failures and Ctrl+C save what was trained.

Also: non-finite weights are never saved, and ``transcriptformer train --overwrite``.
"""

import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

import transcriptformer
from conftest import REFERENCE_INPUT, TRAIN_CONFIG, tiny_train_overrides
from transcriptformer.checkpoint import CONFIG_FILE, load_checkpoint
from transcriptformer.cli import build_parser, main, subcommand_parser
from transcriptformer.cli.common import with_flag_names
from transcriptformer.model.lora import ADAPTER_WEIGHTS_FILE, load_adapters
from transcriptformer.training.config import (
    FinetuneConfig,
    LoraConfig,
    OptimConfig,
    TrainDataConfig,
    TrainerConfig,
    compose_train_config,
)
from transcriptformer.training.run import run_finetuning, run_pretraining
from transcriptformer.training.trainer import INTERRUPTED_DIR, NonFiniteWeightsError, require_finite_weights

REPO = Path(__file__).parent.parent


class FailAtStep(Callback):
    """Fails for real once the run has taken ``step`` optimizer steps: raises ``error``, or sends SIGINT (Ctrl+C)."""

    def __init__(self, step: int, error: Exception | None = None):
        self.step, self.error = step, error

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.error is None:
                signal.raise_signal(signal.SIGINT)
                # Python runs the handler (KeyboardInterrupt) at its next check between bytecodes; a loop's
                # backward jump is one, whereas the raise below may come first (seen once under load in CI).
                for _ in range(1000):
                    time.sleep(0.001)
                raise AssertionError(f"SIGINT did not interrupt the run (handler {signal.getsignal(signal.SIGINT)})")
            raise self.error


class RecordStartStep(Callback):
    def on_train_start(self, trainer, pl_module):
        self.global_step = trainer.global_step


@pytest.fixture
def terminal_sigint():
    """Ctrl+C as in a terminal, then the test process' own handler back.

    A process started in the background by a shell (``cmd &``) inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler (measured: pytest run that way missed the signal); a terminal's process has it.
    Lightning ignores SIGINT after a Ctrl+C shutdown (the command exits then); the test process must not.
    """
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, original)


def finetune_config(reference_dir, reference_input, output, lr=1e-2, **trainer):
    return FinetuneConfig(
        checkpoint_path=str(reference_dir),
        output_path=str(output),
        data=TrainDataConfig(train_files=[str(reference_input)], batch_size=8),
        optim=OptimConfig(lr=lr),
        trainer=TrainerConfig(device="cpu", log_every_n_steps=1, **trainer),
        lora=LoraConfig(r=4),
    )


def tiny_train_args(reference_input, output: Path, *overrides: str) -> list[str]:
    assert reference_input == REFERENCE_INPUT
    return ["train", "--config", str(TRAIN_CONFIG), *tiny_train_overrides(output, *overrides)]


def validation_steps(run_dir: Path) -> list[int]:
    metrics = pd.read_csv(run_dir / "metrics.csv")
    return metrics.dropna(subset=["val/loss"])["step"].tolist()


def test_demo_config_with_fewer_steps_than_an_epoch_validates_and_saves(tmp_path):
    # conf/demo.yaml stops early with patience 3; 2 steps end the first epoch (57 batches) long before its end.
    output, run_dir = tmp_path / "demo", tmp_path / "run"
    args = ["train", "--config", str(REPO / "conf/demo.yaml"), "model_config=tiny", "trainer.max_steps=2"]
    assert main([*args, f"output_path={output}", f"trainer.run_dir={run_dir}"]) == 0
    assert validation_steps(run_dir) == [1]  # one validation, after the last step
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert transcriptformer.load(output, device="cpu").checkpoint.config.model_config.num_layers == 2


def test_finetune_with_early_stopping_and_max_steps_validates_and_saves(reference_dir, reference_input, tmp_path):
    output = tmp_path / "adapters"
    args = ["finetune", "--checkpoint-path", str(reference_dir), "--train-files", str(reference_input)]
    args += ["--val-fraction", "0.25", "--early-stopping-patience", "1", "--max-steps", "2", "--device", "cpu"]
    assert main([*args, "--lora-r", "4", "--output-path", str(output)]) == 0
    assert validation_steps(output / "training_run") == [1]
    load_adapters(load_checkpoint(reference_dir).model, output)


def test_failure_mid_finetuning_saves_adapters_and_a_resumable_checkpoint(
    reference_dir, reference_input, tmp_path, capsys
):
    output = tmp_path / "adapters"
    with pytest.raises(RuntimeError, match="disk on fire") as failure:
        run_finetuning(
            finetune_config(reference_dir, reference_input, output, max_steps=4),
            callbacks=[FailAtStep(2, RuntimeError("disk on fire"))],
        )
    assert not (output / ADAPTER_WEIGHTS_FILE).exists()  # the output path is for finished runs only
    snapshot, last = output / INTERRUPTED_DIR, output / "training_run" / "checkpoints" / "last.ckpt"
    message = capsys.readouterr().err
    assert str(snapshot) in message and f"`resume` {last}" in message  # the parameter; the command says its flag:
    assert f"--resume {last}" in with_flag_names(message, subcommand_parser(build_parser(["finetune"]), "finetune"))
    assert failure.value.__notes__ == [message.strip()]  # so that a traceback ends with it

    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2
    adapters = load_file(snapshot / ADAPTER_WEIGHTS_FILE)
    assert len(adapters) == len(saved["state_dict"]) > 0
    for key, value in saved["state_dict"].items():  # model.base_model.model.X.weight vs base_model.model.X.weight
        torch.testing.assert_close(adapters[key.removeprefix("model.").replace(".default.", ".")], value)
    load_adapters(load_checkpoint(reference_dir).model, snapshot)

    start = RecordStartStep()
    resumed = run_finetuning(
        finetune_config(reference_dir, reference_input, output, max_steps=4, resume=str(last)), callbacks=[start]
    )
    assert start.global_step == 2 and (resumed / ADAPTER_WEIGHTS_FILE).is_file()


def test_ctrl_c_mid_pretraining_saves_the_model_and_exits_nonzero(reference_input, tmp_path, terminal_sigint, capsys):
    output = tmp_path / "model"
    cfg = compose_train_config(REPO / "conf/train.yaml", tiny_train_args(reference_input, output)[3:])
    cfg.trainer.max_steps = 4
    with pytest.raises(SystemExit) as stopped:
        run_pretraining(cfg, callbacks=[FailAtStep(2)])
    assert stopped.value.code != 0
    assert not (output / CONFIG_FILE).exists()
    snapshot, last = output / INTERRUPTED_DIR, output / "training_run" / "checkpoints" / "last.ckpt"
    message = capsys.readouterr().err
    assert "KeyboardInterrupt" in message and f"trainer.resume={last}" in message
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    model = transcriptformer.load(snapshot, device="cpu")
    assert model.embed(reference_input, batch_size=32).shape == (64, 64)


def test_non_finite_weights_are_never_saved(reference_dir):
    # A diverging run stops earlier, at its NaN loss (test_bad_values.py); this guards every save all the same.
    model = load_checkpoint(reference_dir).model
    with torch.no_grad():
        model.mu.mlp.layers[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"not saving the model: 1 trained parameter\(s\).*mu\.mlp"):
        require_finite_weights(model, "the model")


def test_train_refuses_an_existing_output_unless_overwrite(reference_input, tmp_path, capsys):
    output = tmp_path / "model"
    args = tiny_train_args(reference_input, output, "trainer.max_steps=1", "data.val_fraction=0")
    assert main(args) == 0
    first = load_checkpoint(output).model.state_dict()
    capsys.readouterr()
    assert main([*args, "trainer.seed=1"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*args, "trainer.seed=1", "--overwrite"]) == 0
    second = load_checkpoint(output).model.state_dict()
    assert any(not torch.equal(first[key], second[key]) for key in first)
