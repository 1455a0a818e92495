"""Genome-wide screens: every expressed gene of each cell knocked out (or over-expressed), one variant each.

For a cell, the screened genes are its expressed genes (or those of a genes file), the most expressed first, at
most ``max_genes_per_cell``; a variant is the cell with one gene's count changed (0 for a knock-out, the cell's
highest count for an over-expression), tokenized as any cell. A variant whose model inputs equal its cell's (a gene
past the cell's cut, a count at the clip already) is not run and has no row.

Two ways compute the variants' outputs, equal within float32 rounding:

* prefix reuse (:func:`~transcriptformer.model.prefix.predict_variants`): each cell runs once into a key/value
  cache, each variant only from its first changed position (a knock-out of the ``k``-th gene leaves the ``k``
  positions before it as they were);
* the straightforward path: every variant through the one batch loop, as ``perturb`` runs named genes.

Per (cell, gene) pair: ``cosine_shift``, ``delta_log_likelihood``, ``delta_mean_log_likelihood`` as in
:mod:`~transcriptformer.perturbation.effects`, and with a goal state ``goal_shift``: how far the perturbation moves
the cell's embedding toward the goal state's centroid, ``(cos(after, goal) - cos(before, goal)) / (1 - cos(start,
goal))`` with ``start`` the start state's centroid (1: as far as the distance between the two states).

:func:`gene_statistics` ranks the genes against a null of the same cells' perturbations of other genes with a
similar count (docs/perturb.md, "Screens").
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import scipy.stats
import torch

from transcriptformer.config import PredictConfig
from transcriptformer.data.tokenize import TokenizedCells
from transcriptformer.model.outputs import SCREEN_KEYS
from transcriptformer.model.prefix import predict_variants
from transcriptformer.perturbation.effects import cosine_shift
from transcriptformer.perturbation.specs import KNOCK_OUT
from transcriptformer.perturbation.variants import same_inputs
from transcriptformer.pipeline import MemoryLimit, Predictor, predict_gene_outputs
from transcriptformer.runtime import autocast, resolve_precision

# Variants computed per call of the model's prefix path or of the batch loop: bounds memory.
VARIANTS_PER_CALL = 2048
# Pairs of a (cell, count bin) group needed for its null: the pair itself and at least two others.
MIN_GROUP = 3
# Cells a gene needs for a p-value.
MIN_CELLS = 3


@dataclass
class GoalStates:
    """The centroids of the start and goal states' unperturbed cell embeddings."""

    start: np.ndarray
    goal: np.ndarray

    def shift(self, after: np.ndarray, before: np.ndarray) -> np.ndarray:
        """``(n,)`` the move toward the goal of ``after`` from ``before``, relative to the start-goal distance."""
        goal = np.broadcast_to(self.goal, after.shape)
        distance = cosine_shift(self.start[None], self.goal[None])[0]
        return (cosine_shift(before, goal) - cosine_shift(after, goal)) / distance


def screened_columns(cells: TokenizedCells, row: int, kind: str, genes: np.ndarray | None, cap: int) -> np.ndarray:
    """Columns of the genes screened in cell ``row``: expressed (or of ``genes``), most counts first, ``cap`` at most.

    A knock-out screens only genes that the cell expresses; an over-expression also those of ``genes`` it lacks.
    """
    counts = cells.counts[row].toarray().ravel()
    if genes is None:
        candidates = np.flatnonzero(counts > 0)
    else:
        candidates = genes if kind != KNOCK_OUT else genes[counts[genes] > 0]
    order = np.lexsort((candidates, -counts[candidates]))  # most counts first, then in column order
    candidates = candidates[order]
    return candidates[:cap] if cap else candidates


def cell_variants(cells: TokenizedCells, rows: np.ndarray, columns: list[np.ndarray], kind: str) -> TokenizedCells:
    """One variant per (cell ``rows[i]``, column of ``columns[i]``): the gene's count set to 0 or the cell's highest."""
    blocks = []
    for row, cols in zip(rows, columns, strict=True):
        counts = cells.counts[[row] * len(cols)].tolil()
        new = 0 if kind == KNOCK_OUT else cells.counts[row].max()
        counts[np.arange(len(cols)), cols] = new
        blocks.append(sp.csr_matrix(counts))
    n = [len(c) for c in columns]
    counts = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, cells.counts.shape[1]))
    counts.eliminate_zeros()
    return replace(
        cells,
        counts=counts,
        aux_tokens=np.repeat(cells.aux_tokens[rows], n, axis=0),
        obs_names=cells.obs_names[np.repeat(rows, n)],
    )


def changed_variants(cells: TokenizedCells, rows: np.ndarray, variants: TokenizedCells, cell_of: np.ndarray):
    """Whether each variant's model inputs differ from its cell's."""
    inputs = {row: cells.inputs(row) for row in rows}
    return np.array([not same_inputs(variants.inputs(i), inputs[rows[c]]) for i, c in enumerate(cell_of)], dtype=bool)


@dataclass
class ScreenRun:
    """How a screen's cells and variants run: the model, the batch loop's settings, the device, the path.

    Attributes
    ----------
    model : Predictor
    settings : PredictConfig
        Batch size, token budget and precision of the batch loop (output keys: :data:`SCREEN_KEYS`).
    device : torch.device
    prefix_reuse : bool
        Variants through :func:`~transcriptformer.model.prefix.predict_variants`; else through the batch loop.
    gene_columns : ndarray
        ``(vocab_size,)`` the engine's gene axis (the screen keeps no per-gene output: only its size matters).
    goal : GoalStates or None
        The states of ``goal_shift``.
    limit : MemoryLimit or None
        The batch loop's memory limit.
    """

    model: Predictor
    settings: PredictConfig
    device: torch.device
    prefix_reuse: bool
    gene_columns: np.ndarray
    goal: GoalStates | None = None
    limit: MemoryLimit | None = None

    def cell_outputs(self, cells: TokenizedCells) -> dict[str, np.ndarray]:
        """The :data:`SCREEN_KEYS` of ``cells`` through the batch loop."""
        settings = replace(self.settings, output_keys=SCREEN_KEYS)
        no_genes = np.full_like(self.gene_columns, -1)
        return predict_gene_outputs(self.model, cells, settings, self.device, no_genes, limit=self.limit).cell_values

    def variant_outputs(self, cells: TokenizedCells, variants: TokenizedCells, cell_of: np.ndarray):
        """The :data:`SCREEN_KEYS` of ``variants`` (variant ``i`` of cell ``cell_of[i]``)."""
        if not self.prefix_reuse:
            return self.cell_outputs(variants)
        length = min(cells.seq_len, int(max(cells.n_tokens().max(), variants.n_tokens().max())) + 2)
        cell_batch, variant_batch = (
            cells.batch(np.arange(len(cells)), length),
            variants.batch(np.arange(len(variants)), length),
        )
        device = self.device
        precision = resolve_precision(self.settings.precision, device)  # the batch loop's, for the cells
        with torch.inference_mode(), autocast(device, precision):
            after = predict_variants(
                self.model,
                cell_batch.gene_tokens.to(device),
                cell_batch.gene_counts.to(device),
                cell_batch.aux_tokens.to(device) if cell_batch.aux_tokens.numel() else None,
                variant_batch.gene_tokens.to(device),
                variant_batch.gene_counts.to(device),
                torch.as_tensor(cell_of, device=device),
                SCREEN_KEYS,
            )
        return {key: value.float().cpu().numpy() for key, value in after.items()}


def screen_groups(
    run: ScreenRun, cells: TokenizedCells, kind: str, genes: np.ndarray | None, max_genes_per_cell: int
) -> Iterator[pd.DataFrame]:
    """Every screened gene of every cell perturbed: the changed (cell, gene) pairs, a group of whole cells at a time.

    Columns: ``cell``, ``gene_id``, ``count`` (the gene's count in the cell before), ``count_rank`` (1: the cell's
    most expressed), ``cosine_shift``, ``delta_log_likelihood``, ``delta_mean_log_likelihood`` and, with a goal,
    ``goal_shift``. ``genes``: columns of the genes to screen (``None``: every expressed gene). A group holds the
    cells whose variants fit one call (:data:`VARIANTS_PER_CALL`).
    """
    columns = [screened_columns(cells, row, kind, genes, max_genes_per_cell) for row in range(len(cells))]
    start = 0
    while start < len(cells):
        stop, n = start + 1, len(columns[start])
        while stop < len(cells) and n + len(columns[stop]) <= VARIANTS_PER_CALL:
            n, stop = n + len(columns[stop]), stop + 1
        yield screen_group(run, cells, np.arange(start, stop), columns[start:stop], kind)
        start = stop


def screen_cells(
    run: ScreenRun, cells: TokenizedCells, kind: str, genes: np.ndarray | None, max_genes_per_cell: int
) -> pd.DataFrame:
    """The pairs of :func:`screen_groups` in one frame."""
    frames = list(screen_groups(run, cells, kind, genes, max_genes_per_cell))
    if not frames:  # no cell
        return pair_schema(run.goal is not None).empty_table().to_pandas()
    return pd.concat(frames, ignore_index=True)


def take(cells: TokenizedCells, rows: np.ndarray) -> TokenizedCells:
    """The cells ``rows`` of ``cells``."""
    return replace(cells, counts=cells.counts[rows], aux_tokens=cells.aux_tokens[rows], obs_names=cells.obs_names[rows])


def counts_at(counts: sp.csr_matrix, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The counts of the (row, column) pairs, as float64 (scipy gives a sparse matrix, not an array, for no pair)."""
    if not len(rows):
        return np.zeros(0)
    return np.asarray(counts[rows, columns], dtype=np.float64).ravel()


def screen_group(run: ScreenRun, cells: TokenizedCells, rows: np.ndarray, columns: list[np.ndarray], kind: str):
    """The pairs of the cells ``rows`` (``columns``: the genes screened in each), as :func:`screen_groups`."""
    variants = cell_variants(cells, rows, columns, kind)
    cell_of = np.repeat(np.arange(len(rows)), [len(c) for c in columns])
    column = np.concatenate(columns)
    rank = np.concatenate([np.arange(1, len(c) + 1) for c in columns])
    keep = np.flatnonzero(changed_variants(cells, rows, variants, cell_of))
    variants, cell_of, column, rank = take(variants, keep), cell_of[keep], column[keep], rank[keep]
    group = take(cells, rows)
    frame = pd.DataFrame(
        {
            "cell": np.asarray(group.obs_names[cell_of], dtype=str).astype(object),
            "gene_id": np.asarray(cells.gene_ids[column], dtype=str).astype(object),
            "count": counts_at(group.counts, cell_of, column),
            "count_rank": rank.astype(np.int64),
        }
    )
    if not len(keep):
        effects = ["cosine_shift", "delta_log_likelihood", "delta_mean_log_likelihood"]
        return frame.assign(**{key: np.zeros(0) for key in effects + ["goal_shift"] * (run.goal is not None)})
    before = run.cell_outputs(group)
    after = run.variant_outputs(group, variants, cell_of)
    old = {key: value[cell_of] for key, value in before.items()}
    frame["cosine_shift"] = cosine_shift(after["embeddings"], old["embeddings"])
    for key in SCREEN_KEYS[1:]:  # the log-likelihoods after the embeddings
        frame[f"delta_{key}"] = after[key].astype(np.float64) - old[key]
    if run.goal is not None:
        frame["goal_shift"] = run.goal.shift(after["embeddings"].astype(np.float64), old["embeddings"])
    return frame


# The columns of a screen's pairs, as its Parquet files store them (goal_shift only with a goal state).
PAIR_COLUMNS = {
    "cell": pa.string(),
    "gene_id": pa.string(),
    "count": pa.float64(),
    "count_rank": pa.int64(),
    "cosine_shift": pa.float64(),
    "delta_log_likelihood": pa.float64(),
    "delta_mean_log_likelihood": pa.float64(),
    "goal_shift": pa.float64(),
}
EFFECTS = ("cosine_shift", "goal_shift", "delta_log_likelihood", "delta_mean_log_likelihood")
# Bytes a pair takes in a Parquet file of pairs, at most (measured: benchmarks/screen.py, about 40 with a goal).
PAIR_BYTES = 64


def pair_schema(with_goal: bool) -> pa.Schema:
    """The schema of a screen's pairs."""
    return pa.schema([(name, kind) for name, kind in PAIR_COLUMNS.items() if with_goal or name != "goal_shift"])


@contextlib.contextmanager
def pair_writer(path: Path, with_goal: bool) -> Iterator[Callable[[pd.DataFrame], None]]:
    """A function that writes pairs to the Parquet file ``path``, a row group per call, in the block.

    The file is written under a temporary name and renamed when the block ends: a partial file never exists.
    """
    temporary, schema = path.with_name(f".{path.name}.tmp"), pair_schema(with_goal)
    try:
        with pq.ParquetWriter(temporary, schema) as writer:
            yield lambda pairs: writer.write_table(pa.Table.from_pandas(pairs, schema=schema, preserve_index=False))
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def write_pairs(pairs: pd.DataFrame, path: Path, with_goal: bool) -> None:
    """Write ``pairs`` to the Parquet file ``path`` in one row group (:func:`pair_writer`)."""
    with pair_writer(path, with_goal) as write:
        write(pairs)


def merge_pair_files(files: Sequence[Path], path: Path, with_goal: bool) -> int:
    """Write the pairs of ``files``, in order, into one Parquet file, row group by row group; returns the pairs.

    One row group (a group of cells) is in memory at a time.
    """
    n_pairs = 0
    with pq.ParquetWriter(path, pair_schema(with_goal)) as writer:
        for file in files:
            groups = pq.ParquetFile(file)
            for i in range(groups.num_row_groups):
                table = groups.read_row_group(i)
                writer.write_table(table)
                n_pairs += table.num_rows
    return n_pairs


def pair_chunks(pairs: pd.DataFrame | Sequence[Path], columns: Sequence[str] | None = None) -> Iterator[pd.DataFrame]:
    """The pairs a frame (or a row group of the Parquet files of pairs, whole cells) at a time; only ``columns``."""
    if isinstance(pairs, pd.DataFrame):
        yield pairs if columns is None else pairs[list(columns)]
        return
    for file in pairs:
        groups = pq.ParquetFile(file)
        for i in range(groups.num_row_groups):
            yield groups.read_row_group(i, columns=None if columns is None else list(columns)).to_pandas()


def planned_pairs(expressed: np.ndarray, kind: str, n_genes: int | None, cap: int, seq_len: int) -> np.ndarray:
    """``(n_cells,)`` the pairs planned per cell of ``expressed`` genes: an upper bound of the rows of a screen.

    ``n_genes``: the genes of a genes file (``None``: every expressed gene); ``cap``: ``max_genes_per_cell`` (0: all).
    A knock-out of a gene past the cell's cut at ``seq_len`` changes nothing, so a knock-out screen plans at most
    ``seq_len`` pairs a cell; an over-expression screens the genes file's genes a cell lacks too.
    """
    planned = np.asarray(expressed, dtype=np.int64)
    if n_genes is not None:
        planned = np.minimum(planned, n_genes) if kind == KNOCK_OUT else np.full_like(planned, n_genes)
    if cap:
        planned = np.minimum(planned, cap)
    return np.minimum(planned, seq_len) if kind == KNOCK_OUT else planned


def check_disk_space(folder: Path, n_pairs: int) -> None:
    """Raise a ``ValueError`` when the disk of ``folder`` lacks room for the files of a screen of ``n_pairs`` pairs.

    The pairs are written twice: each unit's file while the screen runs, then the merged file (:data:`PAIR_BYTES`).
    """
    needed, free = 2 * n_pairs * PAIR_BYTES, shutil.disk_usage(folder).free
    if needed > free:
        raise ValueError(
            f"the screen plans up to {n_pairs:,} (cell, gene) pairs, about {needed / 2**30:.1f} GiB of files, and "
            f"{folder} has {free / 2**30:.1f} GiB free; free disk space, choose another output_path, or screen fewer "
            "cells or genes (obs_filter, max_genes_per_cell)"
        )


def count_bin_edges(counts: Iterable[np.ndarray], n_bins: int) -> np.ndarray:
    """The edges of ``n_bins`` quantile bins of ``log1p(count)`` over all pairs, duplicates dropped.

    As ``pandas.qcut`` places them (linear interpolation, as ``numpy.quantile``), from the counts' distinct values
    and their frequencies: memory holds the distinct counts, not the pairs.
    """
    frequencies = pd.Series(dtype=np.int64)
    for chunk in counts:
        values, n = np.unique(np.asarray(chunk, dtype=np.float64), return_counts=True)
        frequencies = frequencies.add(pd.Series(n, index=values), fill_value=0)
    frequencies = frequencies.sort_index()
    values, cumulative = np.log1p(frequencies.index.to_numpy()), np.cumsum(frequencies.to_numpy()).astype(np.int64)
    if not len(values):
        return np.zeros(0)
    quantiles = (np.linspace(0, 1, n_bins + 1) * 100) / 100  # as pandas hands them to numpy.percentile
    position = (cumulative[-1] - 1) * quantiles
    below = np.floor(position)
    above = np.minimum(below + 1, cumulative[-1] - 1)
    low, high = (values[np.searchsorted(cumulative, p, side="right")] for p in (below, above))
    gamma = position - below
    edges = np.where(gamma >= 0.5, high - (high - low) * (1 - gamma), low + (high - low) * gamma)
    return edges if len(edges) == 2 else pd.unique(edges)  # pandas keeps the two edges of one bin


def count_bins(counts: pd.Series, edges: np.ndarray) -> np.ndarray:
    """The bin of each count among ``edges`` (:func:`count_bin_edges`), as ``pandas.qcut`` labels it; NaN outside."""
    x = np.log1p(counts.to_numpy(dtype=np.float64))
    if not len(edges):
        return np.full(len(x), np.nan)
    ids = np.searchsorted(edges, x, side="left")
    ids[x == edges[0]] = 1  # the lowest edge belongs to the first bin
    return np.where((ids == 0) | (ids == len(edges)), np.nan, ids - 1)


def null_residuals(pairs: pd.DataFrame, effect: str, bins: np.ndarray) -> np.ndarray:
    """Each pair's ``effect`` against the same cell's pairs of other genes with a similar count, in their sd.

    ``bins``: each pair's count bin (:func:`count_bins`, quantile bins over all pairs); a pair's null is the pairs
    of its cell in its bin, itself left out: ``(x - mean of the others) / sd of the group``. NaN where the group has
    fewer than :data:`MIN_GROUP` pairs or no spread.
    """
    groups = pairs.groupby([pairs["cell"], bins], sort=False)[effect]
    size, total, sd = groups.transform("size"), groups.transform("sum"), groups.transform("std")
    values = pairs[effect]
    others = (total - values) / (size - 1)
    residual = (values - others) / sd
    return residual.where((size >= MIN_GROUP) & (sd > 0)).to_numpy()


def gene_sums(pairs: pd.DataFrame, residual: np.ndarray, effects: Sequence[str]) -> pd.DataFrame:
    """Per gene of ``pairs``: its pairs, the sums of ``effects``, its residuals' count, mean and squared deviations."""
    frame = pairs[["gene_id", *effects]].assign(residual=residual)
    grouped = frame.groupby("gene_id", sort=False)
    sums = grouped[list(effects)].sum()
    sums.insert(0, "n_cells", grouped.size())
    residuals = grouped["residual"]
    n = residuals.count()
    sums["n_residuals"], sums["residual_mean"] = n, residuals.mean()
    sums["residual_m2"] = (residuals.var() * (n - 1)).where(n > 1, 0.0)
    return sums


def add_gene_sums(total: pd.DataFrame | None, more: pd.DataFrame) -> pd.DataFrame:
    """The sums of :func:`gene_sums` of two sets of pairs (the residuals' moments by Chan's formula); genes in order."""
    if total is None:
        return more
    genes = total.index.append(more.index.difference(total.index, sort=False))
    a, b = total.reindex(genes), more.reindex(genes)
    summed = a.add(b, fill_value=0)
    na, nb = a["n_residuals"].fillna(0), b["n_residuals"].fillna(0)
    n = na + nb
    ma, mb = a["residual_mean"].fillna(0), b["residual_mean"].fillna(0)
    delta = mb - ma
    summed["residual_mean"] = (ma + delta * nb / n).where(n > 0)
    spread = delta**2 * na * nb / n.where(n > 0, 1)
    summed["residual_m2"] = a["residual_m2"].fillna(0) + b["residual_m2"].fillna(0) + spread
    return summed


def gene_statistics(pairs: pd.DataFrame | Sequence[Path], effect: str, n_bins: int = 10) -> pd.DataFrame:
    """Per screened gene: its mean effects, and a test of ``effect`` against the null of :func:`null_residuals`.

    ``pairs``: a frame, or Parquet files of pairs (:func:`pair_writer`) read a row group at a time (a cell's pairs
    in one row group): the counts once for the bins (:func:`count_bin_edges`), then each group's residuals summed
    per gene.

    Returns one row per gene in order of first appearance, ranked by p-value then by ``mean_residual``, largest
    first: ``n_cells``, the means of the pairs' effects, ``mean_residual`` (in null standard deviations), ``t`` and
    ``p_value`` (a one-sample t test of the residuals across the gene's cells, one-sided: the gene's perturbation
    moves the cells more than the null's, or further toward the goal), ``fdr`` (Benjamini-Hochberg over the genes
    with a p-value, ``scipy.stats.false_discovery_control``) and ``rank``.
    """
    edges = count_bin_edges((chunk["count"] for chunk in pair_chunks(pairs, ["count"])), n_bins)
    sums = None
    for chunk in pair_chunks(pairs):
        effects = [c for c in EFFECTS if c in chunk]
        residual = null_residuals(chunk, effect, count_bins(chunk["count"], edges))
        sums = add_gene_sums(sums, gene_sums(chunk, residual, effects))
    table = sums[effects].div(sums["n_cells"], axis=0).add_prefix("mean_")
    table.insert(0, "n_cells", sums["n_cells"].astype(np.int64))
    n, mean = sums["n_residuals"], sums["residual_mean"]
    sd = np.sqrt(sums["residual_m2"] / (n - 1)).where(n > 1)
    t = mean / (sd / np.sqrt(n))
    p = pd.Series(scipy.stats.t.sf(t, n - 1), index=t.index).where(n >= MIN_CELLS)  # one-sided: above the null
    table["mean_residual"], table["t"], table["p_value"] = mean, t, p
    valid = p.notna()
    table["fdr"] = np.nan
    table.loc[valid, "fdr"] = scipy.stats.false_discovery_control(p[valid].to_numpy())
    table = table.sort_values(["p_value", "mean_residual"], ascending=[True, False], na_position="last", kind="stable")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table.rename_axis("gene_id")
