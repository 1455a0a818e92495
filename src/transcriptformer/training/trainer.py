"""Lightning's Trainer set up from :class:`TrainerConfig`: devices, precision, logging, checkpoints, resume.

``device``: ``"cpu"`` or ``"0"`` trains on the CPU (``"cpu:N"``: N CPU processes with DDP), ``"N"`` on N GPUs
(DDP when N > 1; several machines with ``num_nodes`` and Lightning's cluster environment variables), ``"cuda"`` on
every GPU, ``"mps"`` on Apple's GPU, ``"auto"`` on every GPU when there is one.

Training never loses work: a run that ``max_steps`` ends mid-epoch still validates once before it stops (so early
stopping and the best checkpoint have their validation loss), and a run that fails or is interrupted (Ctrl+C) after
its first optimizer step writes a resumable ``last.ckpt`` and the model (or adapters) trained so far to
``<output>/interrupted`` before the error goes on. A run whose loss becomes NaN or infinite stops there
(:class:`~transcriptformer.training.module.NonFiniteLossError`) and saves nothing: it diverged. Weights holding NaN
or infinite values are never saved. A resumed checkpoint is read safely (:class:`SafeCheckpointIO`): tensors and
plain values only, never other pickled objects.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision, TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from transcriptformer.console import show_progress, worded
from transcriptformer.errors import UserError
from transcriptformer.runtime import resolve_precision, use_cpu_threads
from transcriptformer.safe_load import load_torch_file
from transcriptformer.training.config import TrainerConfig
from transcriptformer.training.datamodule import CellDataModule
from transcriptformer.training.module import NonFiniteLossError, TranscriptFormerModule
from transcriptformer.training.objective import ObjectiveTerms

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"  # Lightning's name for the latest checkpoint, which ``resume="last"`` reads
INTERRUPTED_DIR = "interrupted"  # <output>/interrupted: the model trained so far when a run stops on an error
SIGTERM_EXIT_CODE = 128 + 15  # the shell's exit status of a process that SIGTERM ended


class NonFiniteWeightsError(UserError, RuntimeError):
    """Trained weights hold NaN or infinite values (the run diverged); they are never saved."""


def require_finite_weights(model: nn.Module, what: str) -> None:
    """Check the trainable parameters of ``model`` before ``what`` is saved.

    Raises
    ------
    NonFiniteWeightsError
        When a trainable parameter holds a NaN or an infinite value.
    """
    bad = [name for name, param in model.named_parameters() if param.requires_grad and not param.isfinite().all()]
    if bad:
        raise NonFiniteWeightsError(
            f"not saving {what}: {len(bad)} trained parameter(s) hold NaN or infinite values (first: {bad[0]}); "
            "the run diverged: lower the learning rate, warm up longer or keep gradient clipping on"
        )


@dataclass(frozen=True)
class TrainedOutput:
    """What a run writes when it ends, and how.

    Attributes
    ----------
    path
        Directory of the finished model or adapters; a failed run writes to ``path / INTERRUPTED_DIR`` instead.
    save
        Writes the model (or adapters) being trained to a directory, replacing what is there.
    what
        Its name in messages, e.g. ``"adapters"``.
    resume_option
        How the run is told to resume, followed by the checkpoint path: ``"`resume` "`` (a parameter, which the
        command line words as ``--resume``), ``"trainer.resume="`` (an override of ``transcriptformer train``).
    """

    path: Path
    save: Callable[[Path], object]
    what: str
    resume_option: str

    @property
    def interrupted_path(self) -> Path:
        """Where a failed or interrupted run saves what it trained."""
        return self.path / INTERRUPTED_DIR


@dataclass(frozen=True)
class Hardware:
    """Lightning's ``accelerator``, ``devices`` and ``strategy`` for a ``device`` setting."""

    accelerator: str
    devices: int
    strategy: str

    @property
    def first_device(self) -> torch.device:
        """The torch device of the first process: the first GPU, Apple's GPU or the CPU."""
        return torch.device({"gpu": "cuda:0", "mps": "mps"}.get(self.accelerator, "cpu"))


def resolve_hardware(device: str, num_nodes: int = 1) -> Hardware:
    """Map the ``device`` setting to Lightning's arguments.

    Raises
    ------
    ValueError
        For a value that is neither ``cpu``, ``cuda``, ``mps``, ``auto`` nor a count, or GPUs asked for where there
        are none.
    """
    value = device.strip().lower()
    if value == "auto":
        value = str(torch.cuda.device_count()) if torch.cuda.is_available() else "cpu"
    if value == "cuda":
        value = str(max(torch.cuda.device_count(), 1))  # none: the error below says so
    if value == "mps":
        if num_nodes > 1 or not torch.backends.mps.is_available():
            raise ValueError("device mps needs Apple's GPU (one machine), which this one lacks; pass `device=cpu`")
        return Hardware("mps", 1, "auto")
    if value in ("cpu", "0") or value.startswith("cpu:"):
        if num_nodes > 1:
            raise ValueError("training on several nodes needs GPUs: pass `device=N` with N >= 1")
        processes = value.removeprefix("cpu:") if value.startswith("cpu:") else "1"
        if not processes.isdigit() or int(processes) < 1:
            raise ValueError(f"device 'cpu:N' needs a number of processes N >= 1, got {device!r}")
        return Hardware("cpu", int(processes), "ddp" if int(processes) > 1 else "auto")
    if not value.isdigit():
        raise ValueError(
            f"device must be 'cpu', 'cpu:N', 'cuda', 'mps', 'auto' or a number of GPUs (0 = CPU), got {device!r}"
        )
    count = int(value)
    available = torch.cuda.device_count()
    if count > available:
        raise ValueError(f"{count} GPU(s) asked for, but this machine has {available}; pass `device=cpu`")
    return Hardware("gpu", count, "ddp" if count > 1 or num_nodes > 1 else "auto")


def precision_arguments(precision: str, hardware: Hardware) -> dict[str, Any]:
    """Lightning's arguments for ``precision`` on ``hardware``.

    ``16-mixed`` on the CPU trains as asked, with the warning of :func:`~transcriptformer.runtime.resolve_precision`
    (Lightning itself would switch to ``bf16-mixed``).
    """
    resolve_precision(precision, hardware.first_device)
    if precision == "16-mixed" and hardware.accelerator == "cpu":
        return {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    return {"precision": precision}


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files, read like every torch file of the package (:func:`load_torch_file`).

    Lightning leaves ``weights_only`` unset, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` would make it unpickle any
    object of a resumed checkpoint; here ``weights_only=True`` is explicit, and the checkpoints Lightning writes
    (tensors, numbers, strings and containers) load as they are.

    Parameters
    ----------
    resume_option
        How the command is told to resume (see :class:`TrainedOutput`), named in errors.
    """

    def __init__(self, resume_option: str) -> None:
        super().__init__()
        self.resume_option = resume_option

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """The checkpoint at ``path`` on the CPU; ``map_location`` and ``weights_only`` are ignored."""
        fix = f"give {self.resume_option.strip()} a checkpoint that this tool's training wrote (checkpoints/last.ckpt)"
        return load_torch_file(path, what="a Lightning checkpoint", fix=fix)


class CellThroughput(Callback):
    """Show cells per second (training batches) in the progress bar."""

    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        """Start the clock of the first batch."""
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        """Cells of this batch over the time since the previous batch ended."""
        now = time.perf_counter()
        cells = batch.gene_tokens.shape[0]
        pl_module.log("cells_per_s", cells / max(now - self._last, 1e-9), prog_bar=True, on_step=True, batch_size=cells)
        self._last = now


class ValidateAtMaxSteps(Callback):
    """Validate on the batch that reaches ``max_steps``, also in the middle of an epoch.

    Lightning validates at the end of each epoch only; a run that ``max_steps`` ends earlier would finish without a
    validation loss (no best checkpoint, nothing for early stopping to compare). Lightning validates on the batch
    at which the trainer is asked to stop, so this callback asks it to stop there.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        """Ask to stop (and so to validate) once ``max_steps`` optimizer steps are done."""
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class KeepWorkOnFailure(Callback):
    """Save the work of a run that fails or is interrupted, and guard every checkpoint against non-finite weights.

    When an exception (Ctrl+C included) stops training after at least one optimizer step, it writes a resumable
    ``last.ckpt`` to the checkpoint directory and the model (or adapters) trained so far to
    :attr:`TrainedOutput.interrupted_path`, and prints where they are and how to resume; the exception then goes
    on, so the command exits with an error. Nothing is saved when the trained weights are not finite.

    Parameters
    ----------
    output
        What the run writes and how.
    checkpoint_dir
        Directory of Lightning's checkpoints, ``last.ckpt`` among them.
    """

    def __init__(self, output: TrainedOutput, checkpoint_dir: Path) -> None:
        self.output = output
        self.checkpoint_dir = checkpoint_dir

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Refuse to write a Lightning checkpoint of non-finite weights (training stops with the error)."""
        require_finite_weights(pl_module, f"a checkpoint at step {trainer.global_step}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Write ``last.ckpt`` and the model trained so far, then report them (on the first process)."""
        if trainer.global_step == 0 or isinstance(exception, NonFiniteWeightsError | NonFiniteLossError):
            return  # nothing trained yet (or not restored yet), or diverged: the error says why nothing is saved
        stopped = f"training stopped by {type(exception).__name__} after {trainer.global_step} optimizer step(s)"
        try:
            require_finite_weights(pl_module, f"the {self.output.what} trained so far")
        except NonFiniteWeightsError as refusal:
            report(trainer, exception, f"{stopped}; {refusal}")
            return
        last = self.checkpoint_dir / LAST_CHECKPOINT
        # Written by the first process without the barrier of trainer.save_checkpoint: under DDP, the other
        # processes may have stopped elsewhere.
        trainer.strategy.save_checkpoint(trainer._checkpoint_connector.dump_checkpoint(weights_only=False), last)
        if trainer.is_global_zero:
            self.output.save(self.output.interrupted_path)
        report(
            trainer,
            exception,
            f"{stopped}\n  {self.output.what} trained so far: {self.output.interrupted_path}\n"
            f"  resumable checkpoint: {last}\n  to continue, run the same command with "
            f"{self.output.resume_option}{last}",
        )


def report(trainer: L.Trainer, exception: BaseException, message: str) -> None:
    """Print ``message`` to stderr (first process only) and add it to ``exception``, so a traceback ends with it."""
    if trainer.is_global_zero:
        print(f"\n{worded(message)}", file=sys.stderr, flush=True)
    exception.add_note(worded(message))


def build_trainer(
    settings: TrainerConfig,
    run_dir: Path,
    has_validation: bool,
    output: TrainedOutput,
    callbacks: Sequence[Callback] = (),
    monitor: tuple[str, str] = TranscriptFormerModule.monitor,
) -> L.Trainer:
    """A Trainer with CSV logging, resumable checkpoints, work kept on failure and, with validation, early stopping.

    Parameters
    ----------
    settings
        Devices, precision, length and checkpointing.
    run_dir
        Receives ``metrics.csv``, ``hparams.yaml`` and ``checkpoints/``.
    has_validation
        Whether validation cells exist; checkpoints then keep the best validation metric, and a run that
        ``max_steps`` ends mid-epoch validates once before it stops.
    output
        What a failed or interrupted run saves (see :class:`KeepWorkOnFailure`).
    callbacks
        Further callbacks.
    monitor
        The validation metric that selects checkpoints and stops early, and its mode (``min`` or ``max``).
    """
    hardware = resolve_hardware(settings.device, settings.num_nodes)
    checkpoint_dir = run_dir / CHECKPOINT_DIR
    metric, mode = monitor
    checkpointing = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="{epoch}-{step}",
        monitor=metric if has_validation else None,
        mode=mode,
        save_top_k=settings.keep_checkpoints,
        save_last=True,
        every_n_train_steps=settings.checkpoint_every_n_steps or None,
    )
    all_callbacks: list[Callback] = [checkpointing, KeepWorkOnFailure(output, checkpoint_dir), CellThroughput()]
    if has_validation:
        all_callbacks.append(ValidateAtMaxSteps())
    if has_validation and settings.early_stopping_patience > 0:
        # Checked after each validation (never at the end of a training epoch that was not validated).
        stopping = EarlyStopping(
            monitor=metric,
            mode=mode,
            patience=settings.early_stopping_patience,
            check_on_train_epoch_end=False,
            strict=False,
        )
        all_callbacks.append(stopping)
    all_callbacks.extend(callbacks)
    precision = precision_arguments(settings.precision, hardware)
    plugins = [SafeCheckpointIO(output.resume_option), *precision.pop("plugins", [])]
    return L.Trainer(
        accelerator=hardware.accelerator,
        devices=hardware.devices,
        strategy=hardware.strategy,
        num_nodes=settings.num_nodes,
        **precision,
        max_epochs=settings.max_epochs,
        max_steps=settings.max_steps,
        accumulate_grad_batches=settings.accumulate_grad_batches,
        gradient_clip_val=settings.gradient_clip_val or None,
        log_every_n_steps=settings.log_every_n_steps,
        logger=CSVLogger(save_dir=run_dir, name="", version=""),
        callbacks=all_callbacks,
        plugins=plugins,
        limit_val_batches=None if has_validation else 0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_progress_bar=show_progress(),
        default_root_dir=run_dir,
    )


def fit(
    module: TranscriptFormerModule,
    data: CellDataModule,
    settings: TrainerConfig,
    run_dir: Path,
    hparams: dict[str, Any],
    output: TrainedOutput,
    callbacks: Sequence[Callback] = (),
) -> L.Trainer:
    """Build the Trainer, train (resuming from ``settings.resume`` when given) and save what was trained.

    Parameters
    ----------
    module, data
        What to train, on what.
    settings
        See :func:`build_trainer`.
    run_dir
        Run directory (logs and checkpoints).
    hparams
        Settings recorded in ``hparams.yaml``.
    output
        Where and how the trained model is saved: to ``output.path`` when training ends (by the first process),
        to ``output.interrupted_path`` when it fails. With validation, a module whose ``restore_best`` is set
        saves the weights of its best validation (``module.monitor``) instead of the last ones.
    callbacks
        Further callbacks.

    Raises
    ------
    NonFiniteWeightsError
        When the trained weights hold NaN or infinite values; nothing is saved.
    SystemExit
        With the code 143 when SIGTERM stopped training (what was trained is saved, see :class:`KeepWorkOnFailure`).
    """
    use_cpu_threads(reserved=data.n_data_workers)  # several processes: Lightning's launcher shares the CPUs instead
    check_resume(settings, run_dir)
    trainer = build_trainer(settings, run_dir, data.has_validation, output, callbacks, module.monitor)
    trainer.logger.log_hyperparams(hparams)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=settings.resume)
    except SIGTERMException:  # Lightning's SystemExit without a code would end the command with 0
        raise SystemExit(SIGTERM_EXIT_CODE) from None
    if trainer.is_global_zero:
        best = trainer.checkpoint_callback.best_model_path if module.restore_best and data.has_validation else ""
        if best:
            module.load_trainable_state(trainer.strategy.checkpoint_io.load_checkpoint(best)["state_dict"])
        require_finite_weights(module, f"the trained {output.what}")
        output.save(output.path)
    return trainer


def check_resume(settings: TrainerConfig, run_dir: Path) -> None:
    """Fail before any work when the checkpoint to resume from is not there.

    Raises
    ------
    FileNotFoundError
        When ``settings.resume`` names no file, or is ``"last"`` and ``run_dir`` holds no ``last.ckpt``.
    """
    resume = settings.resume
    if resume is not None and resume != "last" and not Path(resume).is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {resume}")
    if resume == "last" and not (run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file():
        raise FileNotFoundError(f"no last.ckpt in {run_dir / CHECKPOINT_DIR} to resume from")


def dry_run(module: TranscriptFormerModule, data: CellDataModule, device: torch.device) -> ObjectiveTerms:
    """One forward and backward pass on the first training batch; nothing is written, no weight changes.

    Raises
    ------
    RuntimeError
        When the loss is not finite or a trainable parameter receives no finite gradient.
    """
    module.to(device).train()
    batch = next(iter(data.train_dataloader())).to(device)
    terms = module.objective(batch)
    terms.loss.backward()
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    without_grad = [name for name, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    if not torch.isfinite(terms.loss) or without_grad:
        message = f"loss {float(terms.loss)}, parameters without a finite gradient: {without_grad[:5]}"
        raise RuntimeError(f"dry run failed: {message}")
    module.zero_grad(set_to_none=True)
    return terms
