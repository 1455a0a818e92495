"""Run a unit of cells and their perturbed variants through the one batch loop, and compare them.

The model inputs of a unit are the unperturbed cells that some perturbation changes, then every changed
(perturbation, cell) variant, perturbation by perturbation; they go through
:func:`~transcriptformer.pipeline.predict_gene_outputs` together (length-aware batches across perturbations). A
cell's outputs depend on the cell alone, so the effects depend neither on the batch size nor on the units.

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

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from transcriptformer.config import PredictConfig
from transcriptformer.data.tokenize import TokenizedCells
from transcriptformer.data.vocab import GeneVocab
from transcriptformer.model.outputs import PERTURBATION_KEYS
from transcriptformer.perturbation.specs import Perturbation
from transcriptformer.perturbation.summary import GENE_EFFECTS, MEAN_OF
from transcriptformer.perturbation.variants import Variants, totals
from transcriptformer.pipeline import GeneOutputs, MemoryLimit, Predictor, predict_gene_outputs

# Row names of the effects: "<perturbation>|<cell>".
ROW_SEPARATOR = "|"


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
    order = np.lexsort((column, variant))
    variant, column = variant[order], column[order]
    new = np.asarray(mu_after[variant, column], dtype=np.float64).ravel()
    old = np.asarray(mu_before[variant, column], dtype=np.float64).ravel()
    new_sum = np.bincount(variant, weights=new, minlength=edited.shape[0])[variant]
    old_sum = np.bincount(variant, weights=old, minlength=edited.shape[0])[variant]
    log2_fold_change = np.log2(new / old)
    return {
        "variant": variant,
        "column": column,
        "delta_mu": new - old,
        "log2_fold_change": log2_fold_change,
        "delta_share": new / new_sum - old / old_sum,
        "log2_share_fold_change": log2_fold_change - np.log2(new_sum / old_sum),
    }


def jobs_of(variants: Variants) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs to run, as (perturbation, cell) pairs.

    First the cells that some perturbation changes (perturbation -1), then the changed variants, perturbation by
    perturbation.
    """
    changed = variants.changed
    cells = np.unique(np.concatenate(changed)) if changed else np.zeros(0, np.int64)
    perturbation = np.concatenate([np.full(len(cells), -1), *(np.full(len(c), p) for p, c in enumerate(changed))])
    return perturbation.astype(np.int64), np.concatenate([cells, *changed]).astype(np.int64)


def with_perturbed_genes(gene_columns: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``gene_columns`` with a column after the gene axis for each of ``tokens`` that it lacks.

    A perturbed gene that no input holds (an over-expression) enters only the variants' sequences, where it is
    edited: it has no effect of its own, so these columns hold none.
    """
    columns = gene_columns.copy()
    missing = np.unique(tokens[columns[tokens] < 0])
    columns[missing] = columns.max(initial=-1) + 1 + np.arange(missing.size)
    return columns


def edited_columns(
    perturbations: Sequence[Perturbation], perturbation: np.ndarray, columns: np.ndarray, vocab: GeneVocab
) -> sp.csr_matrix:
    """``(len(perturbation), n_genes)`` ones at the columns of the genes that each row's perturbation edits."""
    edited = [columns[vocab.lookup(list(perturbations[p].gene_ids))] for p in perturbation]
    rows = np.repeat(np.arange(len(perturbation)), [len(c) for c in edited])
    cols = np.concatenate(edited) if edited else rows
    return sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(len(perturbation), int(columns.max()) + 1))


def effects_obs(variants: Variants, rows: np.ndarray, values: dict[str, np.ndarray], total_after: np.ndarray):
    """One row per (cell, perturbation), cell by cell: its effects, 0 for an unaffected one.

    ``rows`` are the rows of the changed variants, ``values`` their :data:`MEAN_OF` and ``total_after`` their total
    input count.
    """
    names = [p.name for p in variants.perturbations]
    cell = np.repeat(np.asarray(variants.cells.obs_names, dtype=str).astype(object), len(names))
    perturbation = np.tile(np.asarray(names, dtype=object), len(variants.cells))
    size = len(perturbation)
    affected = np.zeros(size, dtype=bool)
    affected[rows] = True
    obs = pd.DataFrame(
        {"perturbation": perturbation, "cell": cell, "affected": affected},
        index=pd.Index([f"{p}{ROW_SEPARATOR}{c}" for p, c in zip(perturbation, cell, strict=True)]),
    )
    for key in MEAN_OF:
        obs[key] = np.zeros(size)
        obs.iloc[rows, obs.columns.get_loc(key)] = values[key]
    obs["total_count_before"] = np.repeat(variants.totals, len(names))
    obs["total_count_after"] = obs["total_count_before"].to_numpy()
    obs.iloc[rows, obs.columns.get_loc("total_count_after")] = total_after
    return obs


def perturb_cells(
    model: Predictor,
    cells: TokenizedCells,
    perturbations: Sequence[Perturbation],
    vocab: GeneVocab,
    settings: PredictConfig,
    device: torch.device,
    gene_columns: np.ndarray,
    on_batch: Callable[[int], object] | None = None,
    limit: MemoryLimit | None = None,
) -> tuple[pd.DataFrame, GeneOutputs]:
    """Apply every perturbation to every cell, run the changed variants and their cells, and compare them.

    Parameters
    ----------
    model
        The model (its :class:`~transcriptformer.pipeline.Predictor` interface).
    cells
        The unperturbed cells (a work unit's).
    perturbations
        From :func:`~transcriptformer.perturbation.specs.parse_perturbations`.
    vocab
        The checkpoint's gene vocabulary.
    settings
        Batch size, token budget and precision (its output keys are replaced by what the comparison needs).
    device
        Where the model runs.
    gene_columns
        ``(vocab_size,)`` column of each vocabulary entry on the gene axis of the effects, ``-1`` when absent
        (the engine's :attr:`Session.gene_columns <transcriptformer.engine.session.Session.gene_columns>`).
    on_batch, limit
        As for :func:`~transcriptformer.pipeline.predict_gene_outputs` (``on_batch`` counts model inputs).

    Returns
    -------
    obs, effects
        One row per (cell, perturbation), cell by cell, named ``"<perturbation>|<cell>"``: its
        per-cell effects (:func:`effects_obs`), and its per-gene effects (``gene_values``: each of
        :data:`~transcriptformer.perturbation.summary.GENE_EFFECTS` as a float32 sparse matrix on the gene axis;
        rows of unaffected variants are empty).
    """
    variants = Variants(cells, perturbations, vocab)
    perturbation, cell = jobs_of(variants)
    n_genes = int(gene_columns.max(initial=-1)) + 1
    n_rows = len(perturbations) * len(cells)
    changed = perturbation >= 0
    values = {key: np.zeros(0) for key in MEAN_OF}
    pairs = {key: np.zeros(0) for key in ("variant", "column", *GENE_EFFECTS)}
    total_after = np.zeros(0)
    if changed.any():
        tokens = vocab.lookup([gene for p in perturbations for gene in p.gene_ids])
        columns = with_perturbed_genes(gene_columns, tokens)
        inputs = variants.take(perturbation, cell)
        predict = replace(settings, output_keys=PERTURBATION_KEYS)
        outputs = predict_gene_outputs(model, inputs, predict, device, columns, on_batch=on_batch, limit=limit)
        unperturbed = np.full(len(cells), -1)
        unperturbed[cell[~changed]] = np.flatnonzero(~changed)
        after, before = outputs.take(np.flatnonzero(changed)), outputs.take(unperturbed[cell[changed]])
        new, old = after.cell_values, before.cell_values
        values = {
            "cosine_shift": cosine_shift(new["embeddings"], old["embeddings"]),
            "delta_log_likelihood": new["log_likelihood"].astype(np.float64) - old["log_likelihood"],
            "delta_mean_log_likelihood": new["mean_log_likelihood"].astype(np.float64) - old["mean_log_likelihood"],
        }
        total_after = totals(inputs)[changed]
        pairs = compare(after, before, edited_columns(perturbations, perturbation[changed], columns, vocab))
    rows = cell[changed] * len(perturbations) + perturbation[changed]
    obs = effects_obs(variants, rows, values, total_after)
    effects = GeneOutputs(n_cells=n_rows)
    pair_rows = rows[pairs["variant"].astype(np.int64)]
    for key in GENE_EFFECTS:
        matrix = sp.csr_matrix((pairs[key].astype(np.float32), (pair_rows, pairs["column"])), shape=(n_rows, n_genes))
        effects.gene_values[key] = matrix
    return obs, effects
