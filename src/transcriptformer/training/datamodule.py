"""Cells for training: tokenized files, a seeded validation split, and a resumable Lightning data module.

Each training file is tokenized once with the model's vocabularies (:class:`TokenizedCells`); for classification,
each cell also has a class (:class:`LabelledBatch`) and the validation split is stratified by class. Training batches
gather cells of similar length (built with :meth:`TokenizedCells.batch`) and are trimmed to their longest
cell: padding is masked, so trimming changes no target and no score, only the work spent on padding. The
training order depends only on the seed and the epoch, and the loader is a ``torchdata``
:class:`StatefulDataLoader`, so that a run resumed from a mid-epoch checkpoint sees exactly the batches it
would have seen.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from transcriptformer.data.batching import batch_length
from transcriptformer.data.tokenize import Batch, TokenizedCells

# Batches per group of cells sorted by length in the training order.
LENGTH_GROUP_BATCHES = 16


@dataclass
class LabelledBatch(Batch):
    """Model inputs of ``B`` cells and their classes.

    Attributes
    ----------
    labels : Tensor
        ``(B,)`` long, the class index of each cell.
    """

    labels: torch.Tensor

    @classmethod
    def of(cls, batch: Batch, labels: torch.Tensor) -> LabelledBatch:
        """The inputs of ``batch`` with ``labels``."""
        return cls(batch.gene_tokens, batch.gene_counts, batch.aux_tokens, labels)

    def to(self, device: torch.device | str) -> LabelledBatch:
        """Move every tensor to ``device``."""
        return LabelledBatch.of(super().to(device), self.labels.to(device))


class CellDataset(Dataset[Batch]):
    """Some cells of one tokenized file; item ``i`` is the one-cell :class:`Batch` of ``rows[i]``.

    Parameters
    ----------
    cells
        A tokenized file.
    rows
        Indices of the cells of ``cells`` that belong to this dataset.
    labels
        Class index of every cell of ``cells``; items are then :class:`LabelledBatch` objects.
    """

    def __init__(self, cells: TokenizedCells, rows: np.ndarray, labels: np.ndarray | None = None):
        self.cells = cells
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Batch:
        batch = self.cells.batch([int(self.rows[index])])
        if self.labels is None:
            return batch
        return LabelledBatch.of(batch, torch.tensor([self.labels[index]]))

    def lengths(self) -> np.ndarray:
        """Unpadded sequence length of each cell (without building the sequences)."""
        return self.cells.n_tokens()[self.rows]


def collate_cells(items: Sequence[Batch], pad_index: int, length_multiple: int = 1) -> Batch:
    """Stack one-cell batches (with their labels) and cut the trailing positions that are padding in every cell.

    The length kept is :func:`~transcriptformer.data.batching.batch_length` of the longest cell, rounded up to
    ``length_multiple`` (the attention backend's preference).
    """
    tokens = torch.cat([item.gene_tokens for item in items])
    longest = int((tokens != pad_index).sum(1).max())
    length = batch_length(longest, tokens.shape[1], length_multiple)
    batch = Batch(
        gene_tokens=tokens[:, :length],
        gene_counts=torch.cat([item.gene_counts for item in items])[:, :length],
        aux_tokens=torch.cat([item.aux_tokens for item in items]),
    )
    if not isinstance(items[0], LabelledBatch):
        return batch
    return LabelledBatch.of(batch, torch.cat([item.labels for item in items]))


class EpochShuffleSampler(Sampler[int]):
    """A shuffled order of ``range(n)`` that depends only on the seed and the epoch (set by Lightning).

    With ``lengths``, cells of similar length are grouped (as Hugging Face's ``group_by_length``): the permutation
    is cut into groups of ``group_size`` cells, each sorted by length, so that consecutive batches pad little.

    Parameters
    ----------
    n
        Dataset length.
    seed
        Base seed.
    lengths
        Sequence length of each cell, to group by length.
    group_size
        Cells per group (a multiple of the batch size).
    """

    def __init__(self, n: int, seed: int, lengths: np.ndarray | None = None, group_size: int = 0):
        self.n = n
        self.seed = seed
        self.lengths = lengths
        self.group_size = group_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the order of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator).numpy()
        if self.lengths is not None and self.group_size > 1:
            groups = [order[i : i + self.group_size] for i in range(0, self.n, self.group_size)]
            order = np.concatenate([g[np.argsort(-self.lengths[g], kind="stable")] for g in groups])
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n


def cells_with_tokens(cells: TokenizedCells) -> np.ndarray:
    """Rows of the cells whose sequence has at least one gene of the vocabulary."""
    if not cells.data_config.pad_zeros:
        return np.arange(len(cells))
    return np.flatnonzero((cells.counts > 0).getnnz(axis=1) > 0)


def split_rows(
    n_rows: int, val_fraction: float, seed: int, strata: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n_rows)`` into sorted training and validation rows.

    Parameters
    ----------
    n_rows
        Number of cells.
    val_fraction
        Share held out for validation, rounded to whole cells.
    seed
        Seed of the split.
    strata
        Class of each row: the split keeps each class's share in both parts (scikit-learn's stratified
        ``train_test_split``), with at least one cell of each class on each side.

    Raises
    ------
    ValueError
        With ``strata``, when the validation or training part would have fewer cells than there are classes.
    """
    n_val = int(round(n_rows * val_fraction))
    if strata is None or n_val == 0:
        permutation = np.random.default_rng(seed).permutation(n_rows)
        return np.sort(permutation[n_val:]), np.sort(permutation[:n_val])
    from sklearn.model_selection import train_test_split

    n_classes = len(np.unique(strata))
    if min(n_val, n_rows - n_val) < n_classes:
        raise ValueError(
            f"val_fraction {val_fraction} holds out {n_val} of {n_rows} cells, but a split stratified by class needs "
            f"at least one cell of each of the {n_classes} classes on each side: choose a val_fraction between "
            f"{n_classes / n_rows:.3g} and {1 - n_classes / n_rows:.3g}"
        )
    train, val = train_test_split(np.arange(n_rows), test_size=n_val, stratify=strata, random_state=seed)
    return np.sort(train), np.sort(val)


def build_datasets(
    train_cells: Sequence[TokenizedCells],
    val_cells: Sequence[TokenizedCells],
    val_fraction: float,
    seed: int,
    train_labels: Sequence[np.ndarray] | None = None,
    val_labels: Sequence[np.ndarray] | None = None,
) -> tuple[ConcatDataset, ConcatDataset | None]:
    """Training and validation datasets; cells without any vocabulary gene are left out with a warning.

    Parameters
    ----------
    train_cells
        Tokenized training files.
    val_cells
        Tokenized validation files; when empty, ``val_fraction`` of each training file is held out instead.
    val_fraction
        See above.
    seed
        Seed of the split.
    train_labels, val_labels
        Class index of every cell of each file (-1: a cell left out); the datasets then yield
        :class:`LabelledBatch` objects, and the held-out cells are a split of all training files stratified by class.
    """
    train_labels = train_labels or [None] * len(train_cells)
    val_labels = val_labels or [None] * len(val_cells)
    train_rows = [usable_rows(cells, labels) for cells, labels in zip(train_cells, train_labels, strict=True)]
    if val_cells:
        train_parts = [CellDataset(c, r, y) for c, r, y in zip(train_cells, train_rows, train_labels, strict=True)]
        val_parts = [CellDataset(c, usable_rows(c, y), y) for c, y in zip(val_cells, val_labels, strict=True)]
    elif train_labels[0] is None:
        splits = [split_rows(len(rows), val_fraction, seed + index) for index, rows in enumerate(train_rows)]
        train_parts = [CellDataset(c, r[t]) for c, r, (t, _) in zip(train_cells, train_rows, splits, strict=True)]
        val_parts = [CellDataset(c, r[v]) for c, r, (_, v) in zip(train_cells, train_rows, splits, strict=True)]
    else:
        train_parts, val_parts = stratified_parts(train_cells, train_rows, train_labels, val_fraction, seed)
    train = ConcatDataset(train_parts)
    if len(train) == 0:
        raise ValueError("no training cell has a gene of the model's vocabulary")
    val = ConcatDataset([part for part in val_parts if len(part)]) if any(len(p) for p in val_parts) else None
    return train, val


def stratified_parts(
    cells: Sequence[TokenizedCells],
    rows: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    val_fraction: float,
    seed: int,
) -> tuple[list[CellDataset], list[CellDataset]]:
    """Training and validation parts of each file: a split of the ``rows`` of all files, stratified by class."""
    strata = np.concatenate([y[r] for y, r in zip(labels, rows, strict=True)])
    train_idx, val_idx = split_rows(len(strata), val_fraction, seed, strata)
    starts = np.cumsum([0] + [len(r) for r in rows])
    train_parts, val_parts = [], []
    for c, r, y, start, stop in zip(cells, rows, labels, starts[:-1], starts[1:], strict=True):
        train_parts.append(CellDataset(c, r[train_idx[(train_idx >= start) & (train_idx < stop)] - start], y))
        val_parts.append(CellDataset(c, r[val_idx[(val_idx >= start) & (val_idx < stop)] - start], y))
    return train_parts, val_parts


def usable_rows(cells: TokenizedCells, labels: np.ndarray | None = None) -> np.ndarray:
    """Rows of the cells to train on: those with a gene of the vocabulary and, with ``labels``, a class (>= 0)."""
    rows = keep_cells_with_tokens(cells)
    return rows if labels is None else rows[labels[rows] >= 0]


def keep_cells_with_tokens(cells: TokenizedCells) -> np.ndarray:
    """:func:`cells_with_tokens`, warning about the cells left out."""
    rows = cells_with_tokens(cells)
    if len(rows) < len(cells):
        warnings.warn(
            f"{len(cells) - len(rows)} of {len(cells)} cells express no gene of the model's vocabulary and are "
            "left out of training",
            stacklevel=3,
        )
    return rows


class CellDataModule(L.LightningDataModule):
    """Training and validation loaders over tokenized cells.

    Parameters
    ----------
    train, val
        Datasets from :func:`build_datasets`; ``val`` may be ``None``.
    pad_index
        Index of ``[PAD]``, for trimming batches.
    batch_size
        Cells per batch.
    n_data_workers
        Loader worker processes.
    seed
        Seed of the training order.
    length_multiple
        Batch lengths are rounded up to a multiple of this (see :func:`preferred_length_multiple`).
    """

    def __init__(
        self,
        train: ConcatDataset,
        val: ConcatDataset | None,
        pad_index: int,
        batch_size: int,
        n_data_workers: int = 0,
        seed: int = 0,
        length_multiple: int = 1,
    ):
        super().__init__()
        self.train = train
        self.val = val
        self.batch_size = batch_size
        self.n_data_workers = n_data_workers
        self.seed = seed
        self.collate: Callable[[Sequence[Batch]], Batch] = partial(
            collate_cells, pad_index=pad_index, length_multiple=length_multiple
        )

    @property
    def has_validation(self) -> bool:
        """Whether there are validation cells."""
        return self.val is not None

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int) -> Batch:
        """Move a :class:`Batch` to ``device``."""
        return batch.to(device)

    def train_dataloader(self) -> StatefulDataLoader:
        """Seeded, resumable training order, grouped by length."""
        lengths = np.concatenate([part.lengths() for part in self.train.datasets])
        group_size = self.batch_size * LENGTH_GROUP_BATCHES
        return StatefulDataLoader(
            self.train,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.train), self.seed, lengths, group_size),
            collate_fn=self.collate,
            num_workers=self.n_data_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation cells in a fixed order (none when there is no validation set)."""
        if self.val is None:
            return []
        workers = self.n_data_workers
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=self.collate, num_workers=workers)
