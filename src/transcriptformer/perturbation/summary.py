"""Per-perturbation and per-gene summaries of the effects of perturbations across cells.

Per perturbation, over the cells it affects (an unaffected cell's effects are 0 by definition): their number,
the mean and median cosine shift of the cell embedding, and the mean change of the log-likelihood and of its
per-position mean.

Per perturbation and gene, over the affected cells whose sequence holds the gene before and after: the means of
:data:`GENE_EFFECTS` (defined in :mod:`transcriptformer.perturbation.effects`), and two measures of the log2 fold
change of the gene's share among the cell's other genes across those ``n`` cells, of mean ``m`` and standard
deviation ``s``: ``effect_size = m / s``, and ``score = m / ((s + s0) / sqrt(n))``, a t statistic whose
standard deviation is moderated by ``s0``, the median ``s`` of the perturbation's genes (SAM's statistic, Tusher,
Tibshirani and Chu 2001), so that a gene seen in few cells with a small ``s`` by chance does not lead. Genes are
ranked by ``|score|``; a gene seen in fewer than :data:`MIN_CELLS` cells has none and comes last.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from transcriptformer.data.gene_symbols import symbols_by_id
from transcriptformer.perturbation.specs import Perturbation

# Per-variant numbers averaged over the affected cells of each perturbation.
MEAN_OF = ("cosine_shift", "delta_log_likelihood", "delta_mean_log_likelihood")
# Per-(variant, gene) numbers (transcriptformer.perturbation.effects), in the order of the output's X and layers.
GENE_EFFECTS = ("delta_mu", "log2_fold_change", "delta_share", "log2_share_fold_change")
# Cells a gene must be seen in for its effect size: with fewer, a standard deviation means little.
MIN_CELLS = 3


def gene_symbols(gene_ids: Sequence[str]) -> list[str]:
    """The symbol of each gene id from the bundled tables, ``""`` for an id they lack."""
    table = symbols_by_id()
    return [table.get(gene, "") for gene in gene_ids]


def perturbation_table(perturbations: Sequence[Perturbation], obs: pd.DataFrame) -> pd.DataFrame:
    """One row per perturbation, indexed by name (see the module docstring).

    Parameters
    ----------
    perturbations
        In order.
    obs
        One row per (perturbation, cell): ``perturbation`` (categorical), ``affected`` and :data:`MEAN_OF`.
    """
    affected = obs[obs["affected"]].groupby("perturbation", observed=False)
    table = pd.DataFrame(
        {
            "kind": [p.kind for p in perturbations],
            "gene_ids": ["+".join(p.gene_ids) for p in perturbations],
            "symbols": ["+".join(gene_symbols(p.gene_ids)) for p in perturbations],
            "n_cells": obs.groupby("perturbation", observed=False).size(),
            "n_affected": affected.size(),
            "mean_cosine_shift": affected["cosine_shift"].mean(),
            "median_cosine_shift": affected["cosine_shift"].median(),
            **{f"mean_{key}": affected[key].mean() for key in MEAN_OF[1:]},
        },
        index=pd.Index([p.name for p in perturbations], name="perturbation"),
    )
    return table


def gene_table(
    names: Sequence[str],
    gene_ids: np.ndarray,
    perturbation: np.ndarray,
    column: np.ndarray,
    values: dict[str, np.ndarray],
    top_genes: int,
) -> pd.DataFrame:
    """The ranked table of affected genes, ``top_genes`` per perturbation (0: all), in perturbation order.

    Parameters
    ----------
    names
        Perturbation names, in order.
    gene_ids
        ``(n_genes,)`` id of each gene column.
    perturbation, column
        ``(k,)`` perturbation and gene column of each (variant, gene) pair.
    values
        ``(k,)`` per pair: each of :data:`GENE_EFFECTS`.
    top_genes
        Rows kept per perturbation.
    """
    n_genes = len(gene_ids)
    key = perturbation.astype(np.int64) * n_genes + column
    size = len(names) * n_genes
    n = np.bincount(key, minlength=size)
    present = np.flatnonzero(n)
    n = n[present]
    means = {name: np.bincount(key, weights=v, minlength=size)[present] / n for name, v in values.items()}
    share = values["log2_share_fold_change"]
    squares = np.bincount(key, weights=share**2, minlength=size)[present]
    mean_share = means["log2_share_fold_change"]
    variance = np.divide(squares - n * mean_share**2, n - 1, out=np.full(n.size, np.nan), where=n >= MIN_CELLS)
    sd = np.sqrt(np.clip(variance, 0, None))
    effect = np.divide(mean_share, sd, out=np.full(n.size, np.nan), where=sd > 0)
    order = present // n_genes
    s0 = pd.Series(sd).groupby(order).transform("median").to_numpy()  # NaN where no gene of it has an sd
    genes = gene_ids[present % n_genes]
    table = pd.DataFrame(
        {
            "perturbation": np.asarray(names, dtype=object)[present // n_genes],
            "gene_id": genes,
            "symbol": gene_symbols(genes),
            "n_cells": n,
            **{f"mean_{name}": mean for name, mean in means.items()},
            "effect_size": effect,
            "score": mean_share / ((sd + s0) / np.sqrt(n)),
        }
    )
    table["order"] = order
    table["strength"] = table["score"].abs()
    table = table.sort_values(["order", "strength"], ascending=[True, False], na_position="last", kind="stable")
    table.insert(1, "rank", table.groupby("order").cumcount() + 1)
    if top_genes:
        table = table[table["rank"] <= top_genes]
    return table.drop(columns=["order", "strength"]).reset_index(drop=True)
