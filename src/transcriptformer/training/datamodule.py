"""Cells for training: tokenized files, a seeded validation split, and a resumable Lightning data module.

Each training file is tokenized once with the model's vocabularies (:class:`TokenizedCells`). Training batches
gather cells of similar length (built with :meth:`TokenizedCells.batch`) and are trimmed to their longest
cell: padding is masked, so trimming changes no target and no score, only the work spent on padding. The
training order depends only on the seed and the epoch, and the loader is a ``torchdata``
:class:`StatefulDataLoader`, so that a run resumed from a mid-epoch checkpoint sees exactly the batches it
would have seen.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
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


class CellDataset(Dataset[Batch]):
    """Some cells of one tokenized file; item ``i`` is the one-cell :class:`Batch` of ``rows[i]``.

    Parameters
    ----------
    cells
        A tokenized file.
    rows
        Indices of the cells of ``cells`` that belong to this dataset.
    """

    def __init__(self, cells: TokenizedCells, rows: np.ndarray):
        self.cells = cells
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Batch:
        return self.cells.batch([int(self.rows[index])])

    def lengths(self) -> np.ndarray:
        """Unpadded sequence length of each cell (without building the sequences)."""
        return self.cells.n_tokens()[self.rows]


def collate_cells(items: Sequence[Batch], pad_index: int, length_multiple: int = 1) -> Batch:
    """Stack one-cell batches and cut the trailing positions that are padding in every cell.

    The length kept is :func:`~transcriptformer.data.batching.batch_length` of the longest cell, rounded up to
    ``length_multiple`` (the attention backend's preference).
    """
    tokens = torch.cat([item.gene_tokens for item in items])
    longest = int((tokens != pad_index).sum(1).max())
    length = batch_length(longest, tokens.shape[1], length_multiple)
    return Batch(
        gene_tokens=tokens[:, :length],
        gene_counts=torch.cat([item.gene_counts for item in items])[:, :length],
        aux_tokens=torch.cat([item.aux_tokens for item in items]),
    )


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


def split_rows(n_rows: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n_rows)`` into sorted training and validation rows.

    Parameters
    ----------
    n_rows
        Number of cells.
    val_fraction
        Share held out for validation, rounded to whole cells.
    seed
        Seed of the split.
    """
    permutation = np.random.default_rng(seed).permutation(n_rows)
    n_val = int(round(n_rows * val_fraction))
    return np.sort(permutation[n_val:]), np.sort(permutation[:n_val])


def build_datasets(
    train_cells: Sequence[TokenizedCells], val_cells: Sequence[TokenizedCells], val_fraction: float, seed: int
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
    """
    train_parts, val_parts = [], []
    for index, cells in enumerate(train_cells):
        rows = keep_cells_with_tokens(cells)
        if val_cells:
            train_parts.append(CellDataset(cells, rows))
            continue
        train_idx, val_idx = split_rows(len(rows), val_fraction, seed + index)
        train_parts.append(CellDataset(cells, rows[train_idx]))
        val_parts.append(CellDataset(cells, rows[val_idx]))
    val_parts += [CellDataset(cells, keep_cells_with_tokens(cells)) for cells in val_cells]
    train = ConcatDataset(train_parts)
    if len(train) == 0:
        raise ValueError("no training cell has a gene of the model's vocabulary")
    val = ConcatDataset([part for part in val_parts if len(part)]) if any(len(p) for p in val_parts) else None
    return train, val


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
    num_workers
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
        num_workers: int = 0,
        seed: int = 0,
        length_multiple: int = 1,
    ):
        super().__init__()
        self.train = train
        self.val = val
        self.batch_size = batch_size
        self.num_workers = num_workers
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
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation cells in a fixed order (none when there is no validation set)."""
        if self.val is None:
            return []
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=self.collate, num_workers=self.num_workers)
