"""Run perturbed cells and their unperturbed cells through the one batch loop, and compare them.

The model inputs of a job are, in this order, the unperturbed cells that some perturbation changes, then every
changed (perturbation, cell) variant, perturbation by perturbation. They are cut into chunks of ``chunk_size``
inputs; each chunk goes through :func:`~transcriptformer.pipeline.predict_gene_outputs` (length-aware batches
across perturbations) and is reduced to its effects before the next is built, so memory holds the unperturbed
cells' outputs, one chunk, and the effects. A cell's outputs depend on the cell alone, so the effects depend
neither on the batch size nor on the chunking.

Effects of a variant against its cell:

* ``cosine_shift``: 1 - cosine similarity of the cell embeddings;
* ``delta_log_likelihood``, ``delta_mean_log_likelihood``: change of the cell's log-likelihood (nats, gene
  identities and counts) and of its per-position mean;
* for every gene in both sequences other than the perturbed ones (the cell's *other genes*): ``delta_mu``, the
  change of its expected count, and ``log2_fold_change``, of it; ``delta_share``, the change of its share of the
  other genes' expected counts (``mu`` over their sum), and ``log2_share_fold_change``, of it.

``mu`` is a softmax over the cell's positions times the cell's total input count, so a perturbation moves every
``mu`` by bookkeeping alone: a knock-out lowers the total and frees the gene's share for the others, an
over-expression does the opposite. The share among the other genes is free of both: it moves only where the model
shifts expression from some of them to others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import scipy.sparse as sp
import torch

from transcriptformer.config import PredictSettings
from transcriptformer.console import progress_bar
from transcriptformer.data.tokenize import TokenizedCells
from transcriptformer.data.vocab import GeneVocab
from transcriptformer.model.outputs import PERTURBATION_KEYS
from transcriptformer.perturbation.config import PerturbSettings
from transcriptformer.perturbation.output import PerturbationResult, build_result
from transcriptformer.perturbation.specs import Perturbation
from transcriptformer.perturbation.variants import Variants, totals
from transcriptformer.pipeline import GeneOutputs, Predictor, predict_gene_outputs


@dataclass
class Effects:
    """Effects of some variants: per variant, and per (variant, gene) pair.

    Attributes
    ----------
    perturbation, cell : ndarray
        ``(m,)`` each variant's perturbation and cell.
    cosine_shift, delta_log_likelihood, delta_mean_log_likelihood, total_after : ndarray
        ``(m,)`` per variant; ``total_after``: the variant's total input count.
    variant, column : ndarray
        ``(k,)`` the variant (index into the per-variant arrays) and gene column of each pair.
    delta_mu, log2_fold_change, delta_share, log2_share_fold_change : ndarray
        ``(k,)`` per pair (:data:`~transcriptformer.perturbation.summary.GENE_EFFECTS`).
    """

    perturbation: np.ndarray
    cell: np.ndarray
    cosine_shift: np.ndarray
    delta_log_likelihood: np.ndarray
    delta_mean_log_likelihood: np.ndarray
    total_after: np.ndarray
    variant: np.ndarray
    column: np.ndarray
    delta_mu: np.ndarray
    log2_fold_change: np.ndarray
    delta_share: np.ndarray
    log2_share_fold_change: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[Effects]) -> Effects:
        """Effects of the variants of every part, in order."""
        offsets = np.cumsum([0] + [len(part.cell) for part in parts[:-1]])
        shifted = [replace(part, variant=part.variant + offset) for part, offset in zip(parts, offsets, strict=True)]
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in shifted]) for f in fields(cls)})

    @classmethod
    def empty(cls) -> Effects:
        """No variant."""
        indices = ("perturbation", "cell", "variant", "column")
        return cls(**{f.name: np.zeros(0, np.int64 if f.name in indices else np.float64) for f in fields(cls)})


def cosine_shift(after: np.ndarray, before: np.ndarray) -> np.ndarray:
    """``1 - cos(after, before)`` row by row, in float64."""
    after, before = after.astype(np.float64), before.astype(np.float64)
    cosine = (after * before).sum(1) / (np.linalg.norm(after, axis=1) * np.linalg.norm(before, axis=1))
    return 1.0 - cosine


def structure(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Ones where ``matrix`` stores an entry."""
    ones = matrix.copy()
    ones.data = np.ones_like(ones.data)
    return ones


def compare(after: GeneOutputs, before: GeneOutputs, edited: sp.csr_matrix) -> dict[str, np.ndarray]:
    """Per-gene effects of variants (``after``) against their cells (``before``, rows aligned).

    Parameters
    ----------
    after, before
        Outputs of the variants and of their cells.
    edited
        ``(m, n_genes)`` ones at the genes that each variant's perturbation edits: left out.

    Returns
    -------
    dict of str to ndarray
        ``(k,)`` one entry per (variant, gene) pair of a gene in both sequences and not edited: ``variant``,
        ``column``, and :data:`~transcriptformer.perturbation.summary.GENE_EFFECTS`.
    """
    mu_after, mu_before = after.gene_values["mu"], before.gene_values["mu"]
    common = structure(mu_after).multiply(structure(mu_before)) - structure(mu_after).multiply(edited)
    pairs = sp.coo_matrix(common)
    keep = pairs.data > 0
    variant, column = pairs.row[keep].astype(np.int64), pairs.col[keep].astype(np.int64)
    new = np.asarray(mu_after[variant, column], dtype=np.float64).ravel()
    old = np.asarray(mu_before[variant, column], dtype=np.float64).ravel()
    new_sum = np.bincount(variant, weights=new, minlength=len(edited.indptr) - 1)[variant]
    old_sum = np.bincount(variant, weights=old, minlength=len(edited.indptr) - 1)[variant]
    log2_fold_change = np.log2(new / old)
    return {
        "variant": variant,
        "column": column,
        "delta_mu": new - old,
        "log2_fold_change": log2_fold_change,
        "delta_share": new / new_sum - old / old_sum,
        "log2_share_fold_change": log2_fold_change - np.log2(new_sum / old_sum),
    }


class Unperturbed:
    """The outputs of the unperturbed cells that were run, found by cell."""

    def __init__(self, cells: np.ndarray, n_cells: int):
        self.row = np.full(n_cells, -1)
        self.row[cells] = np.arange(len(cells))
        self.parts: list[GeneOutputs] = []
        self._outputs: GeneOutputs | None = None

    def add(self, outputs: GeneOutputs) -> None:
        """Outputs of the next cells."""
        self.parts.append(outputs)

    def of(self, cells: np.ndarray) -> GeneOutputs:
        """The outputs of ``cells`` (every unperturbed cell has been added)."""
        if self._outputs is None:
            self._outputs = GeneOutputs.concat(self.parts)
            self.parts = []
        return self._outputs.take(self.row[cells])


def effects_of(
    outputs: GeneOutputs,
    perturbation: np.ndarray,
    cell: np.ndarray,
    total_after: np.ndarray,
    unperturbed: Unperturbed,
    variants: Variants,
) -> Effects:
    """The effects of variants (cell ``cell[i]`` under ``perturbation[i]``) from their outputs."""
    before = unperturbed.of(cell)
    columns = [variants.columns[p] for p in perturbation]
    rows = np.repeat(np.arange(len(cell)), [len(c) for c in columns])
    edited = sp.csr_matrix(
        (np.ones(rows.size), (rows, np.concatenate(columns) if columns else rows)), shape=(len(cell), variants.n_genes)
    )
    values, old = outputs.cell_values, before.cell_values
    return Effects(
        perturbation=perturbation,
        cell=cell,
        cosine_shift=cosine_shift(values["embeddings"], old["embeddings"]),
        delta_log_likelihood=values["log_likelihood"].astype(np.float64) - old["log_likelihood"],
        delta_mean_log_likelihood=values["mean_log_likelihood"].astype(np.float64) - old["mean_log_likelihood"],
        total_after=total_after,
        **compare(outputs, before, edited),
    )


def jobs_of(variants: Variants) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs to run, as (perturbation, cell) pairs.

    First the cells that some perturbation changes (perturbation -1), then the changed variants, perturbation by
    perturbation.
    """
    changed = variants.changed
    cells = np.unique(np.concatenate(changed)) if changed else np.zeros(0, np.int64)
    perturbation = np.concatenate([np.full(len(cells), -1), *(np.full(len(c), p) for p, c in enumerate(changed))])
    return perturbation.astype(np.int64), np.concatenate([cells, *changed]).astype(np.int64)


def run_variants(
    model: Predictor,
    variants: Variants,
    predict: PredictSettings,
    chunk_size: int,
    device: torch.device,
) -> tuple[Effects, int]:
    """Run every changed variant and its cell; their effects, and the number of model inputs run."""
    perturbation, cell = jobs_of(variants)
    unperturbed = Unperturbed(cell[perturbation < 0], len(variants.cells))
    gene_columns = np.full(variants.vocab_size, -1)
    gene_columns[variants.cells.gene_tokens] = np.arange(variants.n_genes)
    settings = replace(predict, output_keys=PERTURBATION_KEYS)
    parts = []
    with progress_bar(total=len(cell), unit="cell", desc="perturb", disable=None, delay=1) as bar:
        for start in range(0, len(cell), chunk_size):
            chunk_perturbation, chunk_cell = perturbation[start : start + chunk_size], cell[start : start + chunk_size]
            inputs = variants.take(chunk_perturbation, chunk_cell)
            outputs = predict_gene_outputs(model, inputs, settings, device, gene_columns, on_batch=bar.update)
            changed = np.flatnonzero(chunk_perturbation >= 0)
            if len(changed) < len(chunk_cell):
                unperturbed.add(outputs.take(np.flatnonzero(chunk_perturbation < 0)))
            if len(changed):
                total_after = totals(inputs)[changed]
                parts.append(
                    effects_of(
                        outputs.take(changed),
                        chunk_perturbation[changed],
                        chunk_cell[changed],
                        total_after,
                        unperturbed,
                        variants,
                    )
                )
    return (Effects.concat(parts) if parts else Effects.empty()), len(cell)


def perturb_cells(
    model: Predictor,
    cells: TokenizedCells,
    perturbations: Sequence[Perturbation],
    vocab: GeneVocab,
    settings: PerturbSettings,
    predict: PredictSettings,
    device: torch.device,
) -> PerturbationResult:
    """Apply every perturbation to every cell, run the changed ones, and summarise.

    Parameters
    ----------
    model
        The model (its :class:`~transcriptformer.pipeline.Predictor` interface).
    cells
        The unperturbed cells.
    perturbations
        From :func:`~transcriptformer.perturbation.specs.parse_perturbations` of ``settings``.
    vocab
        The checkpoint's gene vocabulary.
    settings
        Chunk size, the length of the ranked gene table, and what was asked (recorded in the AnnData).
    predict
        Batch size, token budget and precision (its output keys are replaced by what the comparison needs).
    device
        Where the model runs.
    """
    variants = Variants(cells, perturbations, vocab)
    effects, inputs_run = run_variants(model, variants, predict, settings.chunk_size, device)
    return build_result(variants, effects, settings, inputs_run)
