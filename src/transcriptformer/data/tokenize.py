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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from transcriptformer.config import DataConfig
from transcriptformer.console import say
from transcriptformer.data.gene_symbols import (
    ensembl_ids_for_symbols,
    looks_like_ensembl_id,
    species_mismatch,
    symbol_species,
)
from transcriptformer.data.hdf5 import open_hdf5
from transcriptformer.data.sources import H5AD, CountReader, open_counts
from transcriptformer.data.vocab import GeneVocab
from transcriptformer.errors import UserError

# The var column of the CELLxGENE schema (its files, the Census, SOMA experiments made from them) of Ensembl ids.
FEATURE_ID_COLUMN = "feature_id"


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
        ``(n_cells, n_genes)`` raw counts of the genes kept, columns in ``var`` order (NaN and negative entries
        set to 0, infinite ones to ``clip_counts``: :func:`clean_counts`).
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
            cell_tokens, cell_counts = self.inputs(row)
            tokens[i, : min(cell_tokens.size, length)] = cell_tokens[:length]
            counts[i, : min(cell_counts.size, length)] = cell_counts[:length]
        aux = self.aux_tokens[np.asarray(rows, dtype=np.int64)]
        return Batch(torch.from_numpy(tokens), torch.from_numpy(counts), torch.from_numpy(aux))

    def inputs(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Gene tokens and counts that the model reads for one cell, before padding.

        Its :meth:`sequence`, with zero counts as padding (``pad_zeros``) and counts clipped (``clip_counts``).
        """
        cols, counts = self.sequence(row)
        tokens = self.gene_tokens[cols]
        if self.data_config.pad_zeros:
            tokens[counts == 0] = self.pad_index
        if self.data_config.clip_counts is not None:
            counts = np.minimum(counts, self.data_config.clip_counts)
        return tokens, counts


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

    ``gene_col_name`` names a ``var`` column, or ``"index"`` for ``var_names``; a var without that column is read
    from the first of :func:`gene_id_column`'s choices. Gene symbols in it are mapped to Ensembl ids (see
    :mod:`transcriptformer.data.gene_symbols`), with a report of how many mapped.
    """
    gene_col_name = gene_id_column(var, gene_col_name)
    raw_ids = var.index.to_series() if gene_col_name == "index" else var[gene_col_name]
    ids = raw_ids.astype("object").where(raw_ids.notna(), None)
    ids = ensembl_ids_for_symbols(ids, source=f"var[{gene_col_name!r}]")
    ids = ids.map(lambda g: None if g is None else str(g).strip().split(".", 1)[0] or None)
    return ids.reset_index(drop=True)


def gene_id_column(var: pd.DataFrame, gene_col_name: str) -> str:
    """The var column of the gene ids: ``gene_col_name``, else ``feature_id``, else ``"index"`` (var names).

    ``feature_id`` is where the CELLxGENE schema, the Census and ``tiledbsoma.io.from_anndata`` of such files keep
    Ensembl ids; var names count when most of them are gene ids or symbols. A var with none of them is a
    ``KeyError`` that names the columns holding gene ids, if any, as ``gene_col_name`` values.
    """
    if gene_col_name == "index" or gene_col_name in var.columns:
        return gene_col_name
    fallback = FEATURE_ID_COLUMN if FEATURE_ID_COLUMN in var.columns else "index" if gene_id_kind(var.index) else None
    if fallback is not None:
        shown = "var names" if fallback == "index" else f"var[{fallback!r}]"
        say(f"gene ids read from {shown}: var has no column {gene_col_name!r}")
        return fallback
    kinds = {str(column): gene_id_kind(var[column]) for column in var.columns}
    candidates = sorted((c for c, kind in kinds.items() if kind), key=lambda c: -kinds[c])  # Ensembl ids first
    fix = " or ".join(f"`gene_col_name='{c}'`" for c in candidates[:3]) or "`gene_col_name`: the column of gene ids"
    raise KeyError(f"gene id column {gene_col_name!r} not in var (columns: {list(var.columns)}); pass {fix}")


def gene_id_kind(values: pd.Index | pd.Series) -> int:
    """2 when most ``values`` are Ensembl gene ids, 1 when they are gene symbols of a bundled table, else 0."""
    text = pd.Series(values[:2000], dtype="object").dropna().astype(str)
    if text.empty:
        return 0
    return 2 if text.map(looks_like_ensembl_id).mean() >= 0.5 else int(symbol_species(text) is not None)


def check_duplicates(gene_ids: pd.Series, keep_first: bool) -> np.ndarray:
    """Boolean mask of columns to keep; an error names duplicated ids unless ``keep_first``."""
    duplicated = gene_ids.notna() & gene_ids.duplicated(keep="first")
    if duplicated.any() and not keep_first:
        names = sorted(set(gene_ids[duplicated]))
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise ValueError(
            f"{len(names)} gene id(s) occur more than once after version stripping: {shown}. "
            "Pass `remove_duplicate_genes=True` to keep the first of each."
        )
    return ~duplicated.to_numpy()


def warn_missing_aux_columns(columns: Sequence[str], aux_vocabs: Mapping[str, Mapping[str, int]]) -> None:
    """Warn once per aux column that obs lacks: :func:`aux_tokens_from_obs` reads every cell's as unknown."""
    for col in aux_vocabs:
        if col not in columns:
            warnings.warn(f"aux column {col!r} not in obs; treating every cell's {col} as unknown", stacklevel=3)


def aux_tokens_from_obs(
    obs: pd.DataFrame, aux_vocabs: Mapping[str, Mapping[str, int]], aux_pad_token: str = "unknown"
) -> np.ndarray:
    """``(n_cells, n_aux)`` tokens; a value missing from a vocabulary, or a missing column, is unknown."""
    columns = []
    for col, vocab in aux_vocabs.items():
        unknown = vocab[aux_pad_token]
        if col not in obs.columns:
            columns.append(np.full(len(obs), unknown, dtype=np.int64))
            continue
        # Each distinct value is looked up once (a million cells hold a handful of assays); missing ones get code -1.
        codes, values = pd.factorize(obs[col])
        tokens = np.array([vocab.get(str(v), unknown) for v in values] + [unknown], dtype=np.int64)
        columns.append(tokens[codes])
    return np.stack(columns, axis=1).astype(np.int64) if columns else np.zeros((len(obs), 0), np.int64)


def read_counts(reader: CountReader, columns: np.ndarray, start: int, stop: int) -> sp.csr_matrix:
    """Counts of cells ``start .. stop - 1`` over ``columns``, as float32 CSR with sorted indices, as stored."""
    counts = reader.rows(start, stop)[:, columns].astype(np.float32)
    counts.sort_indices()
    return counts


def is_invalid(values: np.ndarray) -> np.ndarray:
    """Entries that are not counts: NaN, infinite or negative."""
    return ~np.isfinite(values) | (values < 0)


def clean_counts(counts: sp.csr_matrix, infinite_to: float | None) -> sp.csr_matrix:
    """Set NaN and negative entries to 0 and infinite ones to ``infinite_to`` (0 when ``None``), in place."""
    data = counts.data
    infinite = np.isposinf(data)
    data[is_invalid(data)] = 0.0
    data[infinite] = 0.0 if infinite_to is None else infinite_to
    return counts


# Cells per block of the pass over a source's counts (checks and statistics of the cell filters).
SCAN_BLOCK_CELLS = 4096


@dataclass
class Entry:
    """One stored count: the cell's row in the source, the column among the genes read, and the value."""

    row: int
    column: int
    value: float


@dataclass
class CountScan:
    """What one pass over the counts of a source's genes read found.

    Attributes
    ----------
    totals : ndarray or None
        ``(n_cells,)`` total count of each cell, with invalid entries cleaned (:func:`clean_counts`); ``None``, like
        ``expressed`` and ``invalid``, for a pass that keeps nothing per cell (the counts below only).
    expressed : ndarray or None
        ``(n_cells,)`` number of positive counts of each cell (after cleaning).
    invalid : ndarray or None
        ``(n_cells,)`` number of NaN, infinite or negative entries of each cell.
    n_invalid : int
        Entries that are NaN, infinite or negative.
    n_invalid_cells : int
        Cells with such an entry.
    n_empty : int
        Cells without a positive count (after cleaning).
    n_infinite : int
        Entries that are ``+inf``.
    n_stored : int
        Stored (nonzero) entries.
    non_integer : int
        Valid entries that are not whole numbers (normalised or log-transformed data).
    first_invalid, first_non_integer : Entry or None
        The first such entry, in row order.
    """

    totals: np.ndarray | None
    expressed: np.ndarray | None
    invalid: np.ndarray | None
    n_invalid: int = 0
    n_invalid_cells: int = 0
    n_empty: int = 0
    n_infinite: int = 0
    n_stored: int = 0
    non_integer: int = 0
    first_invalid: Entry | None = None
    first_non_integer: Entry | None = None

    def add_block(self, start: int, counts: sp.csr_matrix, infinite_to: float | None) -> None:
        """Take the counts of cells ``start .. start + counts.shape[0] - 1`` into account."""
        stop = start + counts.shape[0]
        rows = np.repeat(np.arange(start, stop), np.diff(counts.indptr))
        values = counts.data
        invalid = is_invalid(values)
        fractional = ~invalid & (np.mod(np.where(invalid, 0.0, values), 1) != 0)
        invalid_per_cell = np.bincount(rows[invalid] - start, minlength=stop - start)
        self.n_invalid += int(invalid.sum())
        self.n_invalid_cells += int(np.count_nonzero(invalid_per_cell))
        self.n_infinite += int(np.isposinf(values).sum())
        self.n_stored += values.size
        self.non_integer += int(fractional.sum())
        if self.first_invalid is None and invalid.any():
            self.first_invalid = _entry(rows, counts, np.flatnonzero(invalid)[0])
        if self.first_non_integer is None and fractional.any():
            self.first_non_integer = _entry(rows, counts, np.flatnonzero(fractional)[0])
        cleaned = clean_counts(counts, infinite_to)
        expressed = (cleaned > 0).sum(axis=1).A1
        self.n_empty += int(np.count_nonzero(expressed == 0))
        if self.totals is not None:
            self.invalid[start:stop] = invalid_per_cell
            self.totals[start:stop] = cleaned.astype(np.float64).sum(axis=1).A1
            self.expressed[start:stop] = expressed


def _entry(rows: np.ndarray, counts: sp.csr_matrix, index: int) -> Entry:
    return Entry(int(rows[index]), int(counts.indices[index]), float(counts.data[index]))


def scan_counts(
    reader: CountReader,
    columns: np.ndarray,
    infinite_to: float | None = None,
    per_cell: bool = True,
    block_cells: int = SCAN_BLOCK_CELLS,
    blocks: slice = slice(None),
) -> CountScan:
    """Check every count of ``columns`` and compute the statistics of each cell, reading ``block_cells`` at a time.

    Parameters
    ----------
    reader
        The source.
    columns
        The columns the model reads.
    infinite_to
        What infinite counts count as in ``totals`` (``clip_counts`` when they are clipped).
    per_cell
        Keep each cell's statistics (what the cell filters read); else only the counts over all cells.
    block_cells
        Cells per block read.
    blocks
        The blocks to read, all by default; the statistics of the cells of the others stay 0. Several processes
        share a pass with ``slice(rank, None, world_size)`` and sum their scans.
    """
    n = reader.n_obs
    if per_cell:
        scan = CountScan(np.zeros(n, np.float64), np.zeros(n, np.int64), np.zeros(n, np.int64))
    else:
        scan = CountScan(None, None, None)
    for start in range(0, n, block_cells)[blocks]:
        scan.add_block(start, read_counts(reader, columns, start, min(start + block_cells, n)), infinite_to)
    return scan


# A pass over a source's counts: (reader, columns read, what infinite counts count as, whether to keep each cell's
# statistics) -> statistics.
CountScanner = Callable[[CountReader, np.ndarray, float | None, bool], CountScan]


def drops_cells(config: DataConfig) -> bool:
    """Whether a cell filter of :func:`filter_cells` is on: only then are each cell's statistics needed."""
    return (
        config.invalid_counts == "drop"
        or config.filter_outliers > 0
        or config.min_expressed_genes > 0
        or config.drop_empty_cells
    )


def filter_cells(scan: CountScan, config: DataConfig) -> tuple[np.ndarray, dict[str, int]]:
    """The cells that the run keeps, and how many each filter dropped.

    ``invalid_counts = "drop"`` first leaves out the cells with NaN, infinite or negative counts. Then the original
    release's filters: ``filter_outliers = k`` keeps the cells whose total lies strictly within ``k`` (population)
    standard deviations of the mean total of the cells left; ``min_expressed_genes = m`` keeps the cells with at least
    ``m`` expressed genes. Last, ``drop_empty_cells`` leaves out the cells without any count. All count only the genes
    the model reads.

    Returns
    -------
    keep, dropped
        Boolean mask of the cells kept; cells dropped per filter (``{"filter_outliers=2": 3}``), in filter order.
    """
    keep = np.ones(scan.totals.size, dtype=bool)
    dropped = {}
    if config.invalid_counts == "drop":
        valid = scan.invalid == 0
        dropped["invalid_counts=drop"] = int((keep & ~valid).sum())
        keep &= valid
    if config.filter_outliers > 0 and keep.any():
        totals = scan.totals[keep]
        margin = config.filter_outliers * totals.std()
        inside = (scan.totals > totals.mean() - margin) & (scan.totals < totals.mean() + margin)
        dropped[f"filter_outliers={config.filter_outliers:g}"] = int((keep & ~inside).sum())
        keep &= inside
    if config.min_expressed_genes > 0:
        enough = scan.expressed >= config.min_expressed_genes
        dropped[f"min_expressed_genes={config.min_expressed_genes}"] = int((keep & ~enough).sum())
        keep &= enough
    if config.drop_empty_cells:
        expressing = scan.expressed > 0
        dropped["drop_empty_cells"] = int((keep & ~expressing).sum())
        keep &= expressing
    return keep, dropped


def check_counts(scan: CountScan, reader: CountReader, selection: GeneSelection, config: DataConfig) -> None:
    """Stop at counts that are not counts (unless ``invalid_counts`` says otherwise); warn about non-integer ones.

    Raises
    ------
    UserError
        With ``invalid_counts="error"``, for NaN, infinite or negative counts: the file, how many, the first cell
        and gene; with ``invalid_counts="clip"``, for infinite counts when ``clip_counts`` is off.
    """
    n_invalid = scan.n_invalid
    if n_invalid and config.invalid_counts == "error":
        first = describe_entry(scan.first_invalid, reader, selection)
        raise UserError(
            f"{reader.source}: {n_invalid} count(s) of the {len(selection.columns)} genes read are NaN, infinite or "
            f"negative, in {scan.n_invalid_cells} cell(s) (first: {first}); "
            "fix the data, or pass `invalid_counts='drop'` to leave those cells out, or `invalid_counts='clip'` to set "
            "NaN and negative counts to 0 and infinite ones to clip_counts"
        )
    if scan.n_infinite and config.invalid_counts == "clip" and config.clip_counts is None:
        raise UserError(
            f"{reader.source}: {scan.n_infinite} count(s) are infinite and `invalid_counts='clip'` sets them to "
            "clip_counts, which is off; give clip_counts a value, or pass `invalid_counts='drop'`"
        )
    if scan.non_integer:
        warnings.warn(
            f"{reader.source}: {scan.non_integer} of {scan.n_stored} stored counts of the genes read are not whole "
            f"numbers (first: {describe_entry(scan.first_non_integer, reader, selection)}); TranscriptFormer expects "
            "raw counts: use the layer or .raw that holds them (use_raw)",
            stacklevel=3,
        )


def describe_entry(entry: Entry, reader: CountReader, selection: GeneSelection) -> str:
    """``value 0.5 of cell 'AAAC-1' (row 3), gene ENSG...``."""
    cell = reader.read_obs(entry.row, entry.row + 1).index[0]
    return f"value {entry.value:g} of cell {cell!r} (row {entry.row}), gene {selection.gene_ids[entry.column]}"


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
            "pass `filter_to_vocabs=True` to drop them"
        )
    keep &= tokens >= 0
    # A file of another species shares few genes (orthologues under other ids) with the vocabulary.
    mismatch = species_mismatch(gene_ids.dropna(), gene_vocab.gene_ids) if keep.sum() < len(keep) / 2 else None
    if not keep.any():
        raise ValueError(
            f"none of the {len(gene_ids)} genes of the data is in the model's vocabulary "
            f"(gene ids read from var[{gene_col_name!r}], e.g. {list(gene_ids.dropna()[:3])})"
            + (f": {mismatch}" if mismatch else "")
        )
    if mismatch:
        warnings.warn(
            f"only {int(keep.sum())} of the {len(gene_ids)} genes of the data are in the model's vocabulary: "
            f"{mismatch}",
            stacklevel=2,
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

    def prepare(self, reader: CountReader, scan: CountScanner = scan_counts) -> PreparedCells:
        """Select the reader's genes, check its counts and choose the cells to run.

        One pass over the counts (``scan``: :func:`scan_counts`, or a pass that several processes share) checks
        them (:func:`check_counts`) and applies the cell filters (:func:`filter_cells`); the cells' counts and obs
        (their aux columns) are read again later, in row blocks. The pass keeps each cell's statistics when a cell
        filter is on or the reader holds its obs (a file); for a streamed reader (a SOMA query) without cell
        filters nothing is kept per cell, and with them only the rows of the cells kept once they are chosen.
        """
        config = self.data_config
        selection = select_genes(
            reader.var, self.gene_vocab, config.gene_col_name, config.filter_to_vocabs, self.remove_duplicate_genes
        )
        warn_missing_aux_columns(reader.obs_columns, self.aux_vocabs)
        pad_index = self.gene_vocab.special(config.gene_pad_token)
        per_cell = drops_cells(config) or not reader.streamed
        scanned = scan(reader, selection.columns, config.clip_counts, per_cell)
        check_counts(scanned, reader, selection, config)
        kept, dropped, n_empty = None, {}, scanned.n_empty
        if drops_cells(config):
            keep, dropped = filter_cells(scanned, config)
            kept = None if keep.all() else np.flatnonzero(keep)
            n_empty = int((keep & (scanned.expressed == 0)).sum())
        cells = PreparedCells(
            reader, selection, self.aux_vocabs, config, self.seq_len, pad_index, kept, dropped, n_empty,
            None if reader.streamed else scanned.expressed,
        )  # fmt: skip
        if reader.n_obs and not len(cells):
            raise ValueError(
                f"{reader.source}: {cells.describe_dropped()}; relax them: raise model.data_config.filter_outliers, "
                "lower min_expressed_genes (0 turns a filter off), or keep empty cells or cells with invalid counts"
            )
        if cells.n_dropped:
            warnings.warn(f"{reader.source}: {cells.describe_dropped()}", stacklevel=2)
        if n_empty:
            warnings.warn(f"{reader.source}: {cells.describe_empty()}", stacklevel=2)
        return cells


@dataclass
class PreparedCells:
    """Cells of one source, ready to be tokenized in row blocks of any size.

    When a cell filter (:func:`filter_cells`) dropped cells, the cells are those of the source that the filters
    keep: ``kept`` holds their rows in the source and ``dropped`` how many cells each filter dropped. ``n_empty``
    cells kept have no count among the genes read; the batch loop gives them NaN outputs. ``expressed``: each
    source row's positive counts among the genes read (from the pass that checked them; ``None`` for a streamed
    reader). The aux tokens of a block of cells come from its obs, read with its counts.
    """

    reader: CountReader
    selection: GeneSelection
    aux_vocabs: Mapping[str, Mapping[str, int]]
    data_config: DataConfig
    seq_len: int
    pad_index: int
    kept: np.ndarray | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    n_empty: int = 0
    expressed: np.ndarray | None = None

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

    def describe_empty(self) -> str:
        """What becomes of the cells without any count, e.g. ``2 of 64 cells have no count ...``."""
        return (
            f"{self.n_empty} of {len(self)} cells have no count among the {len(self.selection.columns)} genes read: "
            "their outputs are NaN (training leaves them out); `drop_empty_cells=True` leaves "
            "them out of the outputs"
        )

    def keep_only(self, keep: np.ndarray, name: str) -> PreparedCells:
        """These cells without those whose source row is False in ``keep`` (``(n_obs,)`` bool), counted for ``name``."""
        kept = self.source_rows()
        kept = kept[keep[kept]]
        dropped = {**self.dropped, name: len(self) - kept.size}
        return replace(self, kept=kept, dropped=dropped)

    def source_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows in the source of cells ``start .. stop - 1`` (all by default)."""
        stop = len(self) if stop is None else stop
        return np.arange(start, stop) if self.kept is None else self.kept[start:stop]

    def n_expressed(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``(stop - start,)`` positive counts among the genes read of cells ``start .. stop - 1`` (all by default).

        Not for a streamed reader (a SOMA query), which keeps nothing per cell.
        """
        if self.expressed is None:
            raise ValueError(f"{self.reader.source}: a streamed reader keeps no statistics per cell")
        return self.expressed[self.source_rows(start, stop)]

    def cells(self, start: int = 0, stop: int | None = None) -> TokenizedCells:
        """Tokenized cells ``start .. stop - 1`` (all by default)."""
        rows = self.source_rows(start, stop)
        first, last = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)
        counts = read_counts(self.reader, self.selection.columns, first, last)
        obs = self.reader.read_obs(first, last)
        if counts.shape[0] != rows.size:  # cells dropped between first and last
            counts, obs = counts[rows - first], obs.iloc[rows - first]
        return TokenizedCells(
            counts=clean_counts(counts, self.data_config.clip_counts),
            gene_tokens=self.selection.tokens,
            gene_ids=self.selection.gene_ids,
            aux_tokens=aux_tokens_from_obs(obs, self.aux_vocabs, self.data_config.aux_pad_token),
            obs_names=obs.index,
            data_config=self.data_config,
            seq_len=self.seq_len,
            pad_index=self.pad_index,
        )

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, TokenizedCells]]:
        """Consecutive blocks of at most ``chunk_size`` cells, with the index of each block's first cell."""
        for start in range(0, len(self), chunk_size):
            yield start, self.cells(start, min(start + chunk_size, len(self)))
