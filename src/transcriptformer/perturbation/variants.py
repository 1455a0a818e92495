"""Perturbed cells, built at the count level of :class:`~transcriptformer.data.tokenize.TokenizedCells`.

A perturbation's variant of a cell is the cell's row of counts with the perturbation's genes set to their new
counts; the tokenizer then builds its sequence as for any cell. So a knock-out takes the gene out of the cell's
sequence (with ``pad_zeros``, as every published checkpoint; for a cell cut at ``seq_len`` the next gene enters)
and an over-expressed gene takes the place that the checkpoint's gene order gives it (``var`` order, or by count
with ``sort_genes``) with its count clipped as every count is. A gene of the vocabulary that the file lacks gets
a column after the file's genes, so in ``var`` order it comes after the cell's other genes (and a cell that
already fills ``seq_len`` leaves it out). Variants keep their cell's name (``randomize_genes`` orders genes by
it) and aux values.

A variant whose model inputs (tokens and counts, after the tokenizer's ordering, cutting and clipping) equal its
cell's is unaffected: it is not run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from transcriptformer.data.tokenize import TokenizedCells
from transcriptformer.data.vocab import GeneVocab
from transcriptformer.perturbation.specs import Perturbation


def with_genes(cells: TokenizedCells, gene_ids: Sequence[str], vocab: GeneVocab) -> TokenizedCells:
    """``cells`` with a column of zero counts for each of ``gene_ids`` that they lack, after their genes."""
    present = set(cells.gene_ids)
    missing = [gene for gene in dict.fromkeys(gene_ids) if gene not in present]
    if not missing:
        return cells
    zeros = sp.csr_matrix((len(cells), len(missing)), dtype=cells.counts.dtype)
    return dataclasses.replace(
        cells,
        counts=sp.hstack([cells.counts, zeros], format="csr"),
        gene_tokens=np.concatenate([cells.gene_tokens, vocab.lookup(missing)]),
        gene_ids=np.concatenate([cells.gene_ids, np.array(missing, dtype=object)]),
    )


def totals(cells: TokenizedCells) -> np.ndarray:
    """``(n,)`` each cell's total input count (the total that the count head's ``mu`` is scaled to)."""
    return np.array([cells.inputs(row)[1].sum(dtype=np.float64) for row in range(len(cells))])


def same_inputs(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether two cells' model inputs (:meth:`TokenizedCells.inputs`) are the same tokens and counts."""
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


class Variants:
    """Every perturbation applied to every cell, and which of these variants change the model's inputs.

    Parameters
    ----------
    cells
        The unperturbed cells.
    perturbations
        What to apply.
    vocab
        The checkpoint's gene vocabulary (for genes the cells lack).

    Attributes
    ----------
    vocab_size : int
        Entries of the vocabulary.
    n_data_genes : int
        Genes of the file that the model reads; the gene axis adds the perturbed genes the file lacks.
    cells : TokenizedCells
        The unperturbed cells on the gene axis of the variants: the file's genes, then those added.
    columns : list of ndarray
        Per perturbation, the columns of its genes.
    inputs : list of (ndarray, ndarray)
        Each cell's model inputs (:meth:`TokenizedCells.inputs`).
    totals : ndarray
        ``(n_cells,)`` each cell's total input count.
    changed : list of ndarray
        Per perturbation, the cells (rows of ``cells``) whose inputs it changes, in increasing order.
    """

    def __init__(self, cells: TokenizedCells, perturbations: Sequence[Perturbation], vocab: GeneVocab):
        self.perturbations = list(perturbations)
        self.vocab_size = len(vocab)
        self.n_data_genes = cells.counts.shape[1]
        self.cells = with_genes(cells, [gene for p in self.perturbations for gene in p.gene_ids], vocab)
        column_of = {gene: i for i, gene in enumerate(self.cells.gene_ids)}
        self.columns = [np.array([column_of[gene] for gene in p.gene_ids]) for p in self.perturbations]
        self.highest = self.cells.counts.max(axis=1).toarray().ravel()  # (n_cells,) the default over-expression
        self.inputs = [self.cells.inputs(row) for row in range(len(self.cells))]
        self.totals = np.array([counts.sum(dtype=np.float64) for _, counts in self.inputs])
        self.changed = [self.cells_changed(index) for index in range(len(self.perturbations))]

    @property
    def n_genes(self) -> int:
        """Length of the gene axis."""
        return self.cells.counts.shape[1]

    def new_counts(self, index: int, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), n_edits)`` the counts that perturbation ``index`` gives its genes in cells ``rows``."""
        counts = [edit.count for edit in self.perturbations[index].edits]
        return np.stack([self.highest[rows] if c is None else np.full(len(rows), c) for c in counts], axis=1)

    def counts(self, index: int, rows: np.ndarray) -> sp.csr_matrix:
        """Counts of cells ``rows`` under perturbation ``index``: its genes' columns replaced."""
        columns = self.columns[index]
        keep = np.ones(self.n_genes, dtype=self.cells.counts.dtype)
        keep[columns] = 0
        others = self.cells.counts[rows] @ sp.diags(keep)
        values = self.new_counts(index, rows).astype(self.cells.counts.dtype)
        positions = (np.repeat(np.arange(len(rows)), len(columns)), np.tile(columns, len(rows)))
        edited = sp.csr_matrix((values.ravel(), positions), shape=others.shape)
        counts = sp.csr_matrix(others + edited)
        counts.eliminate_zeros()
        counts.sort_indices()
        return counts

    def cells_changed(self, index: int) -> np.ndarray:
        """The cells whose model inputs perturbation ``index`` changes."""
        columns = self.columns[index]
        all_rows = np.arange(len(self.cells))
        current = self.cells.counts[:, columns].toarray()
        rows = all_rows[(current != self.new_counts(index, all_rows)).any(axis=1)]
        variants = self.take(np.full(len(rows), index), rows)
        differs = [not same_inputs(variants.inputs(i), self.inputs[row]) for i, row in enumerate(rows)]
        return rows[np.array(differs, dtype=bool)]

    def take(self, perturbation: np.ndarray, cell: np.ndarray) -> TokenizedCells:
        """Model-ready cells: for each ``i``, cell ``cell[i]`` under perturbation ``perturbation[i]`` (-1: none).

        Consecutive entries of one perturbation are built together.
        """
        bounds = [*np.flatnonzero(np.diff(perturbation, prepend=-2)), len(perturbation)]
        parts = [sp.csr_matrix((0, self.n_genes), dtype=self.cells.counts.dtype)]
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            index, rows = int(perturbation[start]), cell[start:stop]
            parts.append(self.cells.counts[rows] if index < 0 else self.counts(index, rows))
        return dataclasses.replace(
            self.cells,
            counts=sp.vstack(parts, format="csr"),
            aux_tokens=self.cells.aux_tokens[cell],
            obs_names=self.cells.obs_names[cell],
        )
