"""The LightningModule: training objective, AdamW with warm-up and cosine decay, resumable state.

Dropout is drawn from a generator seeded by (seed, rank, batch index) at each training batch. A resumed run
therefore draws the same dropout masks as an uninterrupted one, whatever else used the global random state in
between, and resuming is exact.

Lightning checkpoints hold the *trainable* parameters only (LoRA adapters, or everything but the frozen gene
table when training from scratch): the frozen weights come back from where they were first read.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from transcriptformer.data.tokenize import Batch
from transcriptformer.errors import UserError
from transcriptformer.model.lora import base_model
from transcriptformer.training.config import OptimConfig
from transcriptformer.training.objective import ObjectiveTerms, training_loss


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite: training stops before the weights take the step."""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def planned_optimizer_steps(trainer: L.Trainer) -> int:
    """Optimizer steps the run will take, from the data module's size and the Trainer's limits.

    Lightning's ``estimated_stepping_batches`` would set the training loader up before a resumed run has restored
    the loader's position, and the run would then restart its epoch from the first batch.
    """
    cells_per_rank = math.ceil(len(trainer.datamodule.train) / trainer.world_size)
    batches = math.ceil(cells_per_rank / trainer.datamodule.batch_size)
    steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    limits = [steps_per_epoch * epochs if epochs else None, trainer.max_steps if trainer.max_steps > 0 else None]
    known = [limit for limit in limits if limit is not None]
    if not known:
        raise ValueError("set max_epochs or max_steps: the learning-rate schedule needs the length of the run")
    return max(1, min(known))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, with weight decay on matrices only (not on biases, norms and embeddings)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_matrix = param.ndim >= 2 and not isinstance(module, nn.Embedding)
            (decay if is_matrix and name == "weight" else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TranscriptFormerModule(L.LightningModule):
    """Train a TranscriptFormer (or its LoRA adapters) on the objective of :func:`training_loss`.

    A subclass trains for another task by overriding :meth:`objective` (and validation); the Trainer selects
    checkpoints and stops early on the validation metric :attr:`monitor`.

    Parameters
    ----------
    model
        A :class:`~transcriptformer.model.transcriptformer.TranscriptFormer` or a ``peft`` model wrapping one;
        its parameters with ``requires_grad`` are trained.
    optim
        Optimizer and schedule settings.
    seed
        Seed of the dropout masks.
    """

    monitor: tuple[str, str] = ("val/loss", "min")
    """The validation metric that selects checkpoints and stops early, and whether lower (min) or higher is better."""
    restore_best: bool = False
    """Whether the weights saved at the end are those of the best validation (instead of the last step)."""

    def __init__(self, model: nn.Module, optim: OptimConfig, seed: int = 0):
        super().__init__()
        self.model = model.train()  # a loaded checkpoint is in eval mode; Lightning keeps the mode it finds
        self.optim = optim
        self.seed = seed
        self.strict_loading = False  # frozen weights are not in Lightning checkpoints; see on_load_checkpoint

    @property
    def transcriptformer(self) -> nn.Module:
        """The TranscriptFormer whose modules (adapted or not) compute the forward pass."""
        return base_model(self.model)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """Objective of one batch, with dropout masks drawn from a per-batch seed.

        Raises
        ------
        NonFiniteLossError
            When the loss is NaN or infinite (no step is taken with it).
        """
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._batch_seed())
            terms = self.objective(batch)
        if not torch.isfinite(terms.loss):
            raise NonFiniteLossError(
                f"the training loss is {float(terms.loss)} at optimizer step {self.global_step} (batch {batch_idx} "
                f"of epoch {self.current_epoch}): the run diverged; lower the learning rate (`lr`, optim.lr), warm "
                "up longer (warmup_steps, optim.warmup_steps) and keep gradient clipping on (gradient_clip, "
                "trainer.gradient_clip_val)"
            )
        self._log_terms("train", terms, batch)
        return terms.loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Objective of one validation batch (dropout off)."""
        self._log_terms("val", self.objective(batch), batch)

    def objective(self, batch: Batch) -> ObjectiveTerms:
        """The training objective of one batch: :func:`training_loss`."""
        return training_loss(self.transcriptformer, batch)

    def _batch_seed(self) -> int:
        """Seed of this training batch: a function of the seed, the rank and the batch index across epochs."""
        entropy = [self.seed, self.global_rank, self.trainer.fit_loop.total_batch_idx]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def _log_terms(self, stage: str, terms: ObjectiveTerms, batch: Batch) -> None:
        per_step = stage == "train"
        for name, value in terms.logged().items():
            self.log(
                f"{stage}/{name}",
                value,
                prog_bar=name == "loss",
                on_step=per_step,
                on_epoch=True,
                batch_size=batch.gene_tokens.shape[0],
                sync_dist=not per_step,
            )

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the trainable parameters; warm-up then cosine decay, stepped every optimizer step."""
        cfg = self.optim
        optimizer = torch.optim.AdamW(parameter_groups(self, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
        total = planned_optimizer_steps(self.trainer)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, total, cfg.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def trainable_state_names(self) -> set[str]:
        """State-dict keys of the trainable parameters (what Lightning checkpoints hold)."""
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable parameters in the Lightning checkpoint."""
        keep = self.trainable_state_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint holds exactly this run's trainable parameters."""
        self.check_trainable_state(checkpoint["state_dict"])

    def load_trainable_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Set the trainable parameters from a Lightning checkpoint's ``state_dict`` (checked first)."""
        self.check_trainable_state(state_dict)
        self.load_state_dict(state_dict, strict=False)

    def check_trainable_state(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint ``state_dict`` that does not hold exactly this run's trainable parameters."""
        saved, expected = set(state_dict), self.trainable_state_names()
        if saved != expected:
            missing, unexpected = sorted(expected - saved), sorted(saved - expected)
            raise ValueError(
                "the checkpoint does not match this run's trainable parameters "
                f"(missing: {missing[:5]}, unexpected: {unexpected[:5]}); resume with the same model and settings"
            )
