"""From an AnnData to gene tokens, counts and aux tokens (SPEC section 4).

:class:`CellTokenizer` selects the genes of a count source (:mod:`transcriptformer.data.sources`), drops the
ones the vocabulary lacks and reads cells in row blocks as :class:`TokenizedCells`, which keep the counts
sparse and build padded batches on demand. How a cell becomes a sequence (gene column, clipping, normalisation,
ordering, padding) is the checkpoint's :class:`~transcriptformer.config.DataConfig`; a loaded checkpoint gives
its tokenizer with :meth:`transcriptformer.checkpoint.Checkpoint.tokenizer`.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from transcriptformer.config import DataConfig
from transcriptformer.data.gene_symbols import ensembl_ids_for_symbols
from transcriptformer.data.hdf5 import open_hdf5
from transcriptformer.data.sources import H5AD, CountReader, open_counts
from transcriptformer.data.vocab import GeneVocab


@dataclass
class Batch:
    """Model inputs for ``B`` cells.

    Attributes
    ----------
    gene_tokens : Tensor
        ``(B, L)`` long.
    gene_counts : Tensor
        ``(B, L)`` float32.
    aux_tokens : Tensor
        ``(B, A)`` long.
    """

    gene_tokens: torch.Tensor
    gene_counts: torch.Tensor
    aux_tokens: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to ``device``."""
        return Batch(self.gene_tokens.to(device), self.gene_counts.to(device), self.aux_tokens.to(device))


@dataclass
class TokenizedCells:
    """Cells ready for the model: sparse counts over the vocabulary's genes and their tokens.

    Attributes
    ----------
    counts : scipy.sparse.csr_matrix
        ``(n_cells, n_genes)`` raw counts of the genes kept, columns in ``var`` order.
    gene_tokens : ndarray
        ``(n_genes,)`` vocabulary index of each kept column.
    gene_ids : ndarray
        ``(n_genes,)`` gene id of each kept column.
    aux_tokens : ndarray
        ``(n_cells, n_aux)`` aux-column tokens.
    obs_names : pandas.Index
        Cell names, in input order.
    data_config : DataConfig
        How a cell becomes a sequence (padding of zeros, ordering, normalisation, clipping).
    seq_len : int
        Gene positions of a full-length sequence.
    pad_index : int
        Vocabulary index of the gene padding token.
    """

    counts: sp.csr_matrix
    gene_tokens: np.ndarray
    gene_ids: np.ndarray
    aux_tokens: np.ndarray
    obs_names: pd.Index
    data_config: DataConfig
    seq_len: int
    pad_index: int

    def __len__(self) -> int:
        return self.counts.shape[0]

    def sequence(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Column indices and counts of one cell's sequence (expressed genes first), before padding.

        Expressed genes come in ``var`` order, by decreasing count with ``sort_genes``, or in the cell's own random
        order with ``randomize_genes`` (:func:`cell_generator`).
        """
        start, stop = self.counts.indptr[row], self.counts.indptr[row + 1]
        cols, values = self.counts.indices[start:stop], self.counts.data[start:stop]
        expressed = values > 0
        cols, values = cols[expressed], values[expressed].astype(np.float32)
        config = self.data_config
        shuffle = cell_generator(self.obs_names[row]) if config.randomize_genes and not config.sort_genes else None
        if config.sort_genes:
            order = np.argsort(-values, kind="stable")
        elif shuffle is not None:
            order = shuffle.permutation(cols.size)
        else:
            order = np.argsort(cols, kind="stable")
        cols, values = cols[order], values[order]
        if not config.pad_zeros and cols.size < self.seq_len:
            zero_cols = np.setdiff1d(np.arange(self.counts.shape[1]), cols, assume_unique=True)
            if shuffle is not None:
                zero_cols = shuffle.permutation(zero_cols)
            zero_cols = zero_cols[: self.seq_len - cols.size]
            cols = np.concatenate([cols, zero_cols])
            values = np.concatenate([values, np.zeros(zero_cols.size, np.float32)])
        cols, values = cols[: self.seq_len], values[: self.seq_len]
        if config.normalize_to_scale > 0 and values.any():
            # Over the genes the sequence keeps, as the original release does (after cutting to seq_len).
            values = values / values.sum() * config.normalize_to_scale
        return cols, values

    def n_tokens(self) -> np.ndarray:
        """Number of unpadded positions of each cell: its expressed genes (all genes without ``pad_zeros``)."""
        if self.data_config.pad_zeros:
            expressed_before = np.concatenate([[0], np.cumsum(self.counts.data > 0)])[self.counts.indptr]
            genes = np.diff(expressed_before)
        else:
            genes = np.full(len(self), self.counts.shape[1])
        return np.minimum(genes, self.seq_len).astype(np.int64)

    def batch(self, rows: Sequence[int] | np.ndarray, length: int | None = None) -> Batch:
        """Build the padded model inputs of ``rows``.

        Parameters
        ----------
        rows
            Cell indices.
        length
            Sequence length of the batch; ``seq_len`` by default.
        """
        length = self.seq_len if length is None else length
        tokens = np.full((len(rows), length), self.pad_index, dtype=np.int64)
        counts = np.zeros((len(rows), length), dtype=np.float32)
        for i, row in enumerate(rows):
            cols, values = self.sequence(row)
            cols, values = cols[:length], values[:length]
            tokens[i, : cols.size] = self.gene_tokens[cols]
            counts[i, : cols.size] = values
        if self.data_config.pad_zeros:
            tokens[counts == 0] = self.pad_index
        if self.data_config.clip_counts is not None:
            np.minimum(counts, self.data_config.clip_counts, out=counts)
        aux = self.aux_tokens[np.asarray(rows, dtype=np.int64)]
        return Batch(torch.from_numpy(tokens), torch.from_numpy(counts), torch.from_numpy(aux))


def cell_generator(name: str) -> np.random.Generator:
    """Random numbers of one cell, seeded by its name: the same gene order for the cell in every run and batch."""
    digest = hashlib.blake2b(str(name).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def read_anndata(data: ad.AnnData | str | Path) -> ad.AnnData:
    """Return ``data`` itself, or read it from an ``.h5ad`` path."""
    if isinstance(data, ad.AnnData):
        return data
    open_hdf5(data, H5AD).close()  # a folder, a truncated file or another format: an error that names the file
    return ad.read_h5ad(data)


def gene_ids_from_var(var: pd.DataFrame, gene_col_name: str) -> pd.Series:
    """Gene ids of each column, version suffix dropped; NaN or empty ids become ``None``.

    ``gene_col_name`` names a ``var`` column, or ``"index"`` for ``var_names``. Gene symbols in it are mapped to
    Ensembl ids (see :mod:`transcriptformer.data.gene_symbols`), with a report of how many mapped.
    """
    if gene_col_name == "index":
        raw_ids = var.index.to_series()
    elif gene_col_name in var.columns:
        raw_ids = var[gene_col_name]
    else:
        raise KeyError(
            f"gene id column {gene_col_name!r} not in var (columns: {list(var.columns)}); "
            "pass gene_col_name='index' to use var_names"
        )
    ids = raw_ids.astype("object").where(raw_ids.notna(), None)
    ids = ensembl_ids_for_symbols(ids, source=f"var[{gene_col_name!r}]")
    ids = ids.map(lambda g: None if g is None else str(g).strip().split(".", 1)[0] or None)
    return ids.reset_index(drop=True)


def check_duplicates(gene_ids: pd.Series, keep_first: bool) -> np.ndarray:
    """Boolean mask of columns to keep; an error names duplicated ids unless ``keep_first``."""
    duplicated = gene_ids.notna() & gene_ids.duplicated(keep="first")
    if duplicated.any() and not keep_first:
        names = sorted(set(gene_ids[duplicated]))
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise ValueError(
            f"{len(names)} gene id(s) occur more than once after version stripping: {shown}. "
            "Use --remove-duplicate-genes (remove_duplicate_genes=True in Python) to keep the first of each."
        )
    return ~duplicated.to_numpy()


def aux_tokens_from_obs(
    obs: pd.DataFrame, aux_vocabs: Mapping[str, Mapping[str, int]], aux_pad_token: str = "unknown"
) -> np.ndarray:
    """``(n_cells, n_aux)`` tokens; a value missing from a vocabulary, or a missing column, is unknown."""
    columns = []
    for col, vocab in aux_vocabs.items():
        unknown = vocab[aux_pad_token]
        if col not in obs.columns:
            warnings.warn(f"aux column {col!r} not in obs; treating every cell's {col} as unknown", stacklevel=3)
            columns.append(np.full(len(obs), unknown, dtype=np.int64))
            continue
        values = obs[col].astype("object")
        columns.append(np.array([vocab.get(str(v), unknown) if pd.notna(v) else unknown for v in values]))
    return np.stack(columns, axis=1).astype(np.int64) if columns else np.zeros((len(obs), 0), np.int64)


def warn_if_not_counts(X: sp.csr_matrix) -> None:
    """Warn when the first cells hold non-integer or negative values: the model expects raw counts."""
    sample = X[: min(X.shape[0], 1000)].data
    if sample.size and (np.any(sample < 0) or not np.all(np.mod(sample, 1) == 0)):
        warnings.warn(
            "the count matrix holds non-integer or negative values; TranscriptFormer expects raw counts "
            "(use the layer or .raw that holds them)",
            stacklevel=3,
        )


def read_counts(reader: CountReader, columns: np.ndarray, start: int, stop: int) -> sp.csr_matrix:
    """Counts of cells ``start .. stop - 1`` over ``columns``, as float32 CSR with sorted indices."""
    counts = reader.rows(start, stop)[:, columns].astype(np.float32)
    counts.sort_indices()
    return counts


# Cells per block of the pass that computes the statistics of the cell filters.
FILTER_BLOCK_CELLS = 4096


def cell_statistics(
    reader: CountReader, columns: np.ndarray, block_cells: int = FILTER_BLOCK_CELLS
) -> tuple[np.ndarray, np.ndarray]:
    """Total count and number of expressed genes of every cell over ``columns``, read ``block_cells`` at a time."""
    totals = np.zeros(reader.n_obs, dtype=np.float64)
    expressed = np.zeros(reader.n_obs, dtype=np.int64)
    for start in range(0, reader.n_obs, block_cells):
        stop = min(start + block_cells, reader.n_obs)
        counts = read_counts(reader, columns, start, stop)
        totals[start:stop] = counts.astype(np.float64).sum(axis=1).A1
        expressed[start:stop] = (counts > 0).sum(axis=1).A1
    return totals, expressed


def filter_cells(totals: np.ndarray, expressed: np.ndarray, config: DataConfig) -> tuple[np.ndarray, dict[str, int]]:
    """The cells that the original release's filters keep, and how many each filter dropped.

    ``filter_outliers = k`` keeps the cells whose total lies strictly within ``k`` (population) standard
    deviations of the mean total of all cells; ``min_expressed_genes = m`` then keeps the cells with at least
    ``m`` expressed genes. Both count only the genes the model reads.

    Returns
    -------
    keep, dropped
        Boolean mask of the cells kept; cells dropped per filter (``{"filter_outliers=2": 3}``), in filter order.
    """
    keep = np.ones(totals.size, dtype=bool)
    dropped = {}
    if config.filter_outliers > 0 and totals.size:
        margin = config.filter_outliers * totals.std()
        inside = (totals > totals.mean() - margin) & (totals < totals.mean() + margin)
        dropped[f"filter_outliers={config.filter_outliers:g}"] = int((keep & ~inside).sum())
        keep &= inside
    if config.min_expressed_genes > 0:
        enough = expressed >= config.min_expressed_genes
        dropped[f"min_expressed_genes={config.min_expressed_genes}"] = int((keep & ~enough).sum())
        keep &= enough
    return keep, dropped


@dataclass(frozen=True)
class GeneSelection:
    """Columns of a count matrix that the model reads, with their tokens and gene ids."""

    columns: np.ndarray
    tokens: np.ndarray
    gene_ids: np.ndarray


def select_genes(
    var: pd.DataFrame,
    gene_vocab: GeneVocab,
    gene_col_name: str = "ensembl_id",
    filter_to_vocabs: bool = True,
    remove_duplicate_genes: bool = False,
) -> GeneSelection:
    """Keep the columns whose gene id is present, unique (or first) and in the vocabulary."""
    gene_ids = gene_ids_from_var(var, gene_col_name)
    keep = gene_ids.notna().to_numpy() & check_duplicates(gene_ids, remove_duplicate_genes)
    tokens = gene_vocab.lookup([g or "" for g in gene_ids])
    missing = keep & (tokens < 0)
    if missing.any() and not filter_to_vocabs:
        raise ValueError(
            f"{int(missing.sum())} gene(s) are not in the model's vocabulary (e.g. {list(gene_ids[missing][:5])}); "
            "use --filter-to-vocabs (filter_to_vocabs=True in Python) to drop them"
        )
    keep &= tokens >= 0
    if not keep.any():
        raise ValueError(
            f"none of the {len(gene_ids)} genes of the data is in the model's vocabulary "
            f"(gene ids read from var[{gene_col_name!r}], e.g. {list(gene_ids.dropna()[:3])})"
        )
    columns = np.flatnonzero(keep)
    return GeneSelection(columns=columns, tokens=tokens[columns], gene_ids=gene_ids.to_numpy()[columns])


@dataclass
class CellTokenizer:
    """Turns cells into model inputs with a checkpoint's vocabularies (SPEC section 4).

    Attributes
    ----------
    gene_vocab, aux_vocabs
        The checkpoint's vocabularies.
    data_config
        How a cell becomes a sequence: the gene id column (``"index"`` for ``var_names``), vocabulary filtering
        (genes the vocabulary lacks are dropped, or an error), clipping, normalisation, ordering, padding, and
        the names of the padding tokens.
    seq_len
        Gene positions of a full-length sequence.
    remove_duplicate_genes
        Keep the first of duplicated gene ids instead of raising.
    """

    gene_vocab: GeneVocab
    aux_vocabs: Mapping[str, Mapping[str, int]]
    data_config: DataConfig
    seq_len: int
    remove_duplicate_genes: bool = False

    def tokenize(self, data: ad.AnnData | str | Path, use_raw: bool | None = None) -> TokenizedCells:
        """Every cell of an AnnData (or of a ``.h5ad``, ``.zarr`` or 10x ``.h5`` file) at once.

        ``use_raw``: ``None`` uses ``raw`` when present; ``True`` requires it; ``False`` uses ``X``.
        """
        with open_counts(data, use_raw) as reader:
            return self.prepare(reader).cells()

    def prepare(self, reader: CountReader) -> PreparedCells:
        """Select the reader's genes and read its aux columns; counts are read later, in row blocks."""
        config = self.data_config
        selection = select_genes(
            reader.var, self.gene_vocab, config.gene_col_name, config.filter_to_vocabs, self.remove_duplicate_genes
        )
        aux = aux_tokens_from_obs(reader.obs, self.aux_vocabs, config.aux_pad_token)
        pad_index = self.gene_vocab.special(config.gene_pad_token)
        if not config.filters_cells:
            return PreparedCells(reader, selection, aux, config, self.seq_len, pad_index)
        keep, dropped = filter_cells(*cell_statistics(reader, selection.columns), config)
        cells = PreparedCells(reader, selection, aux, config, self.seq_len, pad_index, np.flatnonzero(keep), dropped)
        if reader.n_obs and not len(cells):
            raise ValueError(
                f"{reader.source}: {cells.describe_dropped()}; "
                "raise model.data_config.filter_outliers or lower min_expressed_genes (0 turns a filter off)"
            )
        if cells.n_dropped:
            warnings.warn(f"{reader.source}: {cells.describe_dropped()}", stacklevel=2)
        return cells


@dataclass
class PreparedCells:
    """Cells of one source, ready to be tokenized in row blocks of any size.

    With a cell filter on (:attr:`DataConfig.filters_cells`), the cells are those of the source that it keeps:
    ``kept`` holds their rows in the source and ``dropped`` how many cells each filter dropped.
    """

    reader: CountReader
    selection: GeneSelection
    aux_tokens: np.ndarray
    data_config: DataConfig
    seq_len: int
    pad_index: int
    kept: np.ndarray | None = None
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.reader.n_obs if self.kept is None else self.kept.size

    @property
    def n_dropped(self) -> int:
        """Cells of the source that the cell filters dropped."""
        return self.reader.n_obs - len(self)

    def describe_dropped(self) -> str:
        """What the cell filters did, e.g. ``the cell filters dropped 3 of 64 cells (2 by filter_outliers=2, ...)``."""
        per_filter = ", ".join(f"{count} by {name}" for name, count in self.dropped.items())
        return f"the cell filters dropped {self.n_dropped} of {self.reader.n_obs} cells ({per_filter})"

    def source_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows in the source of cells ``start .. stop - 1`` (all by default)."""
        stop = len(self) if stop is None else stop
        return np.arange(start, stop) if self.kept is None else self.kept[start:stop]

    def cells(self, start: int = 0, stop: int | None = None) -> TokenizedCells:
        """Tokenized cells ``start .. stop - 1`` (all by default)."""
        rows = self.source_rows(start, stop)
        first, last = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)
        counts = read_counts(self.reader, self.selection.columns, first, last)
        if counts.shape[0] != rows.size:  # cells dropped between first and last
            counts = counts[rows - first]
        if start == 0:
            warn_if_not_counts(counts)
        return TokenizedCells(
            counts=counts,
            gene_tokens=self.selection.tokens,
            gene_ids=self.selection.gene_ids,
            aux_tokens=self.aux_tokens[rows],
            obs_names=self.reader.obs.index[rows],
            data_config=self.data_config,
            seq_len=self.seq_len,
            pad_index=self.pad_index,
        )

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, TokenizedCells]]:
        """Consecutive blocks of at most ``chunk_size`` cells, with the index of each block's first cell."""
        for start in range(0, len(self), chunk_size):
            yield start, self.cells(start, min(start + chunk_size, len(self)))
