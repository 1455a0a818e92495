"""Supervised fine-tuning for cell classification (``transcriptformer finetune --task classify``).

The cell embedding of the model (:attr:`~transcriptformer.model.transcriptformer.ModelOutput.embeddings`, computed
as inference computes it, ``embed_mode=True``, with dropout on while training) goes through a classification head
(:class:`~transcriptformer.model.classifier.ClassifierHead`); the LoRA adapters and the head are trained on the
cross-entropy of the cells' classes, each class weighted by the inverse of its share of the training cells
(``class_weights="balanced"``). The validation cells are a split of the training cells stratified by class; the
run keeps the weights of the best validation macro F1, on which it also stops early.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassF1Score

from transcriptformer.data.tokenize import TokenizedCells
from transcriptformer.errors import UserError, first_few
from transcriptformer.model.classifier import ClassifierHead
from transcriptformer.training.config import ClassifyConfig, OptimConfig
from transcriptformer.training.datamodule import CellDataModule, LabelledBatch
from transcriptformer.training.module import TranscriptFormerModule

VAL_F1 = "val/macro_f1"


@dataclass
class ClassLabels:
    """The classes of a classification run and the class of every cell of its files.

    Attributes
    ----------
    label_key : str
        The ``obs`` column read.
    classes : list of str
        Class names, sorted; a class's index is its position here.
    train, val : list of ndarray
        Class index of each cell of each training (validation) file; -1 for a cell left out (no label, or a class
        left out).
    """

    label_key: str
    classes: list[str]
    train: list[np.ndarray]
    val: list[np.ndarray]


def label_column(adata: ad.AnnData, label_key: str, source: object) -> pd.Series:
    """``adata.obs[label_key]`` as strings (missing values stay missing).

    Raises
    ------
    UserError
        When the column does not exist; the message lists the columns there are.
    """
    if label_key not in adata.obs.columns:
        columns = [str(column) for column in adata.obs.columns]
        close = difflib.get_close_matches(label_key, columns, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(
            f"{source} has no obs column {label_key!r} to take the classes from{hint}; choose label_key among its "
            f"obs columns: {first_few(columns) or 'none'}"
        )
    return adata.obs[label_key].astype(object).map(lambda value: value if pd.isna(value) else str(value))


def class_labels(train: Sequence[pd.Series], val: Sequence[pd.Series], settings: ClassifyConfig) -> ClassLabels:
    """Classes of the training files and the class of each cell; classes under ``min_cells_per_class`` are left out.

    Parameters
    ----------
    train, val
        The label column (:func:`label_column`) of each training and validation file.
    settings
        Label column and the smallest class kept.

    Raises
    ------
    UserError
        When fewer than two classes have enough cells.
    """
    key = settings.label_key
    counts = pd.concat(train).value_counts()
    kept = counts[counts >= settings.min_cells_per_class]
    if len(kept) < 2:
        found = first_few([f"{name!r} ({n} cells)" for name, n in counts.items()]) or "no labelled cell"
        raise UserError(
            f"obs column {key!r} of the training files has {len(kept)} class(es) of at least "
            f"{settings.min_cells_per_class} cells (found: {found}); a classifier needs at least two: choose another "
            "label_key, add cells, or lower min_cells_per_class"
        )
    left_out = counts[counts < settings.min_cells_per_class]
    if len(left_out):
        names = first_few([f"{name!r} ({n})" for name, n in left_out.items()])
        warnings.warn(
            f"{len(left_out)} class(es) of {key!r} have fewer than {settings.min_cells_per_class} training cells and "
            f"are left out with their {int(left_out.sum())} cells: {names} (min_cells_per_class)",
            stacklevel=2,
        )
    unlabelled = sum(int(column.isna().sum()) for column in [*train, *val])
    if unlabelled:
        warnings.warn(f"{unlabelled} cells have no {key!r} and are left out", stacklevel=2)
    encode = {name: index for index, name in enumerate(sorted(kept.index))}
    val_codes = [_codes(column, encode) for column in val]
    unknown = sum(int(((y < 0) & column.notna().to_numpy()).sum()) for y, column in zip(val_codes, val, strict=True))
    if unknown:
        warnings.warn(f"{unknown} validation cells have a class that training leaves out; left out", stacklevel=2)
    return ClassLabels(key, list(encode), [_codes(column, encode) for column in train], val_codes)


def _codes(column: pd.Series, encode: dict[str, int]) -> np.ndarray:
    return column.map(encode).fillna(-1).to_numpy(dtype=np.int64)


def labels_of_cells(codes: np.ndarray, adata: ad.AnnData, cells: TokenizedCells) -> np.ndarray:
    """The class index of each tokenized cell, from ``codes`` (one per cell of ``adata``).

    The tokenizer's cell filters may leave cells of ``adata`` out; the others are found by their ``obs_names``.

    Raises
    ------
    UserError
        When cells were left out and the ``obs_names`` are not unique, so that the others cannot be found.
    """
    if len(cells) == adata.n_obs:
        return codes
    if not adata.obs_names.is_unique:
        raise UserError(
            "the cell filters of the checkpoint left cells out, and the obs_names are not unique, so the classes of "
            "the others cannot be found: make them unique (adata.obs_names_make_unique()) and save the file again"
        )
    return codes[adata.obs_names.get_indexer(cells.obs_names)]


def training_labels(data: CellDataModule) -> np.ndarray:
    """Class index of every training cell of ``data``."""
    return np.concatenate([part.labels for part in data.train.datasets])


def class_weights(labels: np.ndarray, n_classes: int, scheme: str) -> Tensor:
    """Cross-entropy weight of each class: ``"balanced"`` (scikit-learn's) or ``"none"`` (all 1)."""
    if scheme == "none":
        return torch.ones(n_classes)
    from sklearn.utils.class_weight import compute_class_weight

    return torch.tensor(compute_class_weight("balanced", classes=np.arange(n_classes), y=labels), dtype=torch.float32)


@dataclass
class ClassificationTerms:
    """The classification objective of one batch.

    Attributes
    ----------
    loss : Tensor
        Class-weighted cross-entropy (weights normalised over the batch, as torch's ``cross_entropy``).
    accuracy : Tensor
        Share of the batch's cells whose most probable class is theirs.
    logits : Tensor
        ``(B, n_classes)`` class logits.
    n_cells : int
        Cells of the batch.
    """

    loss: Tensor
    accuracy: Tensor
    logits: Tensor
    n_cells: int

    def summary(self) -> str:
        """One line: loss and accuracy."""
        loss, accuracy = float(self.loss.detach()), float(self.accuracy)
        return f"loss {loss:.4f} (cross-entropy), accuracy {accuracy:.2f} over {self.n_cells} cells"

    def logged(self) -> dict[str, Tensor]:
        """Loss and accuracy."""
        return {"loss": self.loss.detach(), "accuracy": self.accuracy}


class ClassificationModule(TranscriptFormerModule):
    """Train adapters and a classification head on the cell embedding; validate with the macro F1.

    Parameters
    ----------
    model
        A ``peft`` model wrapping a TranscriptFormer (or the TranscriptFormer), as for
        :class:`~transcriptformer.training.module.TranscriptFormerModule`.
    head
        The classification head; trained in full.
    weights
        ``(n_classes,)`` cross-entropy weight of each class.
    optim
        Optimizer and schedule settings.
    seed
        Seed of the dropout masks.
    """

    monitor = (VAL_F1, "max")
    restore_best = True

    def __init__(self, model: nn.Module, head: ClassifierHead, weights: Tensor, optim: OptimConfig, seed: int = 0):
        super().__init__(model, optim, seed)
        self.head = head.train()
        self.register_buffer("class_weights", weights.float())
        self.val_f1 = MulticlassF1Score(num_classes=len(weights), average="macro")

    def logits(self, batch: LabelledBatch) -> Tensor:
        """``(B, n_classes)`` class logits of the cells' embeddings (as inference computes them)."""
        out = self.transcriptformer(
            batch.gene_tokens, batch.gene_counts, batch.aux_tokens, compute_mu=False, compute_gene_logits=False
        )
        return self.head(out.embeddings)

    def objective(self, batch: LabelledBatch) -> ClassificationTerms:
        """Class-weighted cross-entropy of the batch."""
        logits = self.logits(batch)
        loss = nn.functional.cross_entropy(logits, batch.labels, weight=self.class_weights)
        accuracy = (logits.argmax(-1) == batch.labels).float().mean()
        return ClassificationTerms(loss, accuracy.detach(), logits.detach(), len(batch.labels))

    def validation_step(self, batch: LabelledBatch, batch_idx: int) -> None:
        """Loss and accuracy of a validation batch; its predictions count towards the epoch's macro F1."""
        terms = self.objective(batch)
        self._log_terms("val", terms, batch)
        self.val_f1.update(terms.logits.argmax(-1), batch.labels)
        self.log(VAL_F1, self.val_f1, prog_bar=True, on_step=False, on_epoch=True, batch_size=terms.n_cells)
