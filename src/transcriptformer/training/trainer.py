"""Lightning's Trainer set up from :class:`TrainerSettings`: devices, precision, logging, checkpoints, resume.

``devices``: ``"cpu"`` or ``"0"`` trains on the CPU (``"cpu:N"``: N CPU processes with DDP), ``"N"`` on N GPUs
(DDP when N > 1; several machines with ``num_nodes`` and Lightning's cluster environment variables), ``"auto"`` on
every GPU when there is one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from transcriptformer.training.config import TrainerSettings
from transcriptformer.training.datamodule import CellDataModule
from transcriptformer.training.module import TranscriptFormerModule
from transcriptformer.training.objective import LossTerms, training_loss

CHECKPOINT_DIR = "checkpoints"


@dataclass(frozen=True)
class Hardware:
    """Lightning's ``accelerator``, ``devices`` and ``strategy`` for a ``--devices`` value."""

    accelerator: str
    devices: int
    strategy: str


def resolve_hardware(devices: str, num_nodes: int = 1) -> Hardware:
    """Map ``--devices`` to Lightning's arguments.

    Raises
    ------
    ValueError
        For a value that is neither ``cpu``, ``auto`` nor a count, or GPUs asked for where there are none.
    """
    value = devices.strip().lower()
    if value == "auto":
        value = str(torch.cuda.device_count()) if torch.cuda.is_available() else "cpu"
    if value in ("cpu", "0") or value.startswith("cpu:"):
        if num_nodes > 1:
            raise ValueError("training on several nodes needs GPUs: pass --devices N with N >= 1")
        processes = value.removeprefix("cpu:") if value.startswith("cpu:") else "1"
        if not processes.isdigit() or int(processes) < 1:
            raise ValueError(f"devices 'cpu:N' needs a number of processes N >= 1, got {devices!r}")
        return Hardware("cpu", int(processes), "ddp" if int(processes) > 1 else "auto")
    if not value.isdigit():
        raise ValueError(f"devices must be 'cpu', 'cpu:N', 'auto' or a number of GPUs (0 = CPU), got {devices!r}")
    count = int(value)
    available = torch.cuda.device_count()
    if count > available:
        raise ValueError(f"{count} GPU(s) asked for, but this machine has {available}; pass --devices cpu")
    return Hardware("gpu", count, "ddp" if count > 1 or num_nodes > 1 else "auto")


def check_precision(precision: str, accelerator: str) -> None:
    """Float16 mixed precision needs a GPU; bfloat16 and float32 run everywhere."""
    if precision == "16-mixed" and accelerator == "cpu":
        raise ValueError("precision 16-mixed needs a GPU; on the CPU use 32 or bf16-mixed")


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


def build_trainer(
    settings: TrainerSettings, run_dir: Path, has_validation: bool, callbacks: Sequence[Callback] = ()
) -> L.Trainer:
    """A Trainer with CSV logging, resumable checkpoints and, with validation, early stopping.

    Parameters
    ----------
    settings
        Devices, precision, length and checkpointing.
    run_dir
        Receives ``metrics.csv``, ``hparams.yaml`` and ``checkpoints/``.
    has_validation
        Whether validation cells exist; checkpoints then keep the best validation loss.
    callbacks
        Further callbacks.
    """
    hardware = resolve_hardware(settings.devices, settings.num_nodes)
    check_precision(settings.precision, hardware.accelerator)
    checkpointing = ModelCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        filename="{epoch}-{step}",
        monitor="val/loss" if has_validation else None,
        save_top_k=settings.keep_checkpoints,
        save_last=True,
        every_n_train_steps=settings.checkpoint_every_n_steps or None,
    )
    all_callbacks: list[Callback] = [checkpointing, CellThroughput(), *callbacks]
    if has_validation and settings.early_stopping_patience > 0:
        all_callbacks.append(EarlyStopping(monitor="val/loss", patience=settings.early_stopping_patience))
    return L.Trainer(
        accelerator=hardware.accelerator,
        devices=hardware.devices,
        strategy=hardware.strategy,
        num_nodes=settings.num_nodes,
        precision=settings.precision,
        max_epochs=settings.max_epochs,
        max_steps=settings.max_steps,
        accumulate_grad_batches=settings.accumulate_grad_batches,
        gradient_clip_val=settings.gradient_clip_val or None,
        log_every_n_steps=settings.log_every_n_steps,
        logger=CSVLogger(save_dir=run_dir, name="", version=""),
        callbacks=all_callbacks,
        limit_val_batches=None if has_validation else 0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )


def fit(
    module: TranscriptFormerModule,
    data: CellDataModule,
    settings: TrainerSettings,
    run_dir: Path,
    hparams: dict[str, Any],
    callbacks: Sequence[Callback] = (),
) -> L.Trainer:
    """Build the Trainer and train, resuming from ``settings.resume`` when given.

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
    callbacks
        Further callbacks.
    """
    trainer = build_trainer(settings, run_dir, data.has_validation, callbacks)
    trainer.logger.log_hyperparams(hparams)
    resume = settings.resume
    if resume is not None and resume != "last" and not Path(resume).is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {resume}")
    if resume == "last" and not (run_dir / CHECKPOINT_DIR / "last.ckpt").is_file():
        raise FileNotFoundError(f"no last.ckpt in {run_dir / CHECKPOINT_DIR} to resume from")
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return trainer


def dry_run(module: TranscriptFormerModule, data: CellDataModule, device: torch.device) -> LossTerms:
    """One forward and backward pass on the first training batch; nothing is written, no weight changes.

    Raises
    ------
    RuntimeError
        When the loss is not finite or a trainable parameter receives no finite gradient.
    """
    module.to(device).train()
    batch = next(iter(data.train_dataloader())).to(device)
    terms = training_loss(module.transcriptformer, batch)
    terms.loss.backward()
    trainable = [(name, p) for name, p in module.model.named_parameters() if p.requires_grad]
    without_grad = [name for name, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    if not torch.isfinite(terms.loss) or without_grad:
        message = f"loss {float(terms.loss)}, parameters without a finite gradient: {without_grad[:5]}"
        raise RuntimeError(f"dry run failed: {message}")
    module.zero_grad(set_to_none=True)
    return terms
