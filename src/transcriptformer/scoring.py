"""Score cells with the generative model: log-likelihoods per cell and per gene, and likelihood outliers for QC.

The scores are outputs of the model (``log_likelihood*`` in :data:`~transcriptformer.model.outputs.OUTPUTS`),
computed by the one batch loop in the forward pass that computes the other outputs; ``docs/score.md`` defines them.
This module adds what a use of them needs:

* the QC rule (:func:`flag_outliers`): the robust z-score of each cell's ``mean_log_likelihood`` against the
  other cells scored with it, ``z = (x - median) / (1.4826 * MAD)``, and a flag for ``z < -threshold``; cells
  without a score (no counts: NaN) are neither flagged nor counted in the median and MAD;
* ``transcriptformer score`` (:func:`run_score`): an inference run of the score outputs whose output file gets the
  outlier columns in its one atomic write, and a summary;
* what :meth:`TranscriptFormerModel.score <transcriptformer.api.TranscriptFormerModel.score>` writes into an
  AnnData (:func:`write_to_anndata`; per-gene scores placed on its var by :func:`on_var`, :func:`var_positions`).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem
from scipy.stats import median_abs_deviation

from transcriptformer.inference.config import OUTLIER_COLUMN, QC_SCORE, ROBUST_Z_COLUMN, RunConfig, ScoreConfig
from transcriptformer.inference.runner import run_inference
from transcriptformer.model.outputs import OUTPUTS, SCORE_KEYS

# uns key of the outlier rule as applied: its threshold, the median and scale it found, the cells it counted.
QC_KEY = "score_qc"
# The per-cell scores, in OUTPUTS order: the columns of TranscriptFormerModel.score's table before the QC columns.
CELL_SCORE_KEYS = tuple(key for key in SCORE_KEYS if OUTPUTS[key].level == "cell")
# The per-gene score that TranscriptFormerModel.score writes into an AnnData's layers.
GENE_SCORE_KEY = "gene_log_likelihood"
MAD_TO_SD = 1.4826  # scipy's scale="normal": the MAD of a normal distribution times this is its standard deviation


def robust_z(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Robust z-scores of ``values`` against their own median and scaled median absolute deviation.

    NaN values (cells without a score) get NaN and are left out of the median and MAD.

    Returns
    -------
    z, median, scale
        ``z = (values - median) / scale`` with ``scale = 1.4826 * MAD``; all NaN (with a warning) when fewer than
        two values are finite or they do not vary (``scale = 0``).
    """
    values = np.asarray(values, dtype=np.float64)
    scored = values[np.isfinite(values)]
    median = float(np.median(scored)) if scored.size else float("nan")
    scale = float(median_abs_deviation(scored, scale="normal")) if scored.size > 1 else 0.0
    if not scale > 0:
        warnings.warn(
            f"{scored.size} cell(s) with a score, whose {QC_SCORE} does not vary: no robust z-score, and no cell is "
            "flagged as an outlier; score more cells together",
            stacklevel=2,
        )
        return np.full(values.shape, np.nan), median, scale
    return (values - median) / scale, median, scale


def flag_outliers(frame: pd.DataFrame, threshold: float = ScoreConfig.outlier_threshold) -> tuple[pd.DataFrame, dict]:
    """Add the QC columns to a table of cells with a ``mean_log_likelihood`` column.

    Parameters
    ----------
    frame
        One row per cell (an output's obs, or :meth:`TranscriptFormerModel.score`'s table).
    threshold
        A cell is an outlier when its robust z-score is below ``-threshold``.

    Returns
    -------
    frame, record
        A copy of ``frame`` with ``mean_log_likelihood_robust_z`` (float, NaN for cells without a score) and
        ``likelihood_outlier`` (bool), and the rule as applied, for ``uns["score_qc"]``.
    """
    z, median, scale = robust_z(frame[QC_SCORE].to_numpy())
    flagged = z < -threshold  # False for NaN
    frame = frame.assign(**{ROBUST_Z_COLUMN: z, OUTLIER_COLUMN: flagged})
    record = {
        "rule": (
            f"{OUTLIER_COLUMN} = {ROBUST_Z_COLUMN} < -threshold; {ROBUST_Z_COLUMN} = ({QC_SCORE} - median) / scale, "
            f"scale = {MAD_TO_SD} * median absolute deviation, both over the cells with a score"
        ),
        "score": QC_SCORE,
        "threshold": float(threshold),
        "median": median,
        "scale": scale,
        "cells_scored": int(np.isfinite(frame[QC_SCORE].to_numpy(dtype=np.float64)).sum()),
        "cells": len(frame),
        "outliers": int(flagged.sum()),
    }
    return frame, record


def outlier_columns(obs: pd.DataFrame, threshold: float) -> tuple[pd.DataFrame, dict]:
    """:func:`flag_outliers` for an output file's obs: the obs to write, and the record as its ``uns`` entry."""
    obs, record = flag_outliers(obs, threshold)
    return obs, {QC_KEY: record}


def describe(record: dict) -> str:
    """One line about the outliers found (a ``uns["score_qc"]`` record)."""
    unscored = record["cells"] - record["cells_scored"]
    return (
        f"Scored {record['cells_scored']} of {record['cells']} cells"
        + (f" ({unscored} without counts: NaN scores, not flagged)" if unscored else "")
        + f"; {record['outliers']} flagged as {OUTLIER_COLUMN}: {ROBUST_Z_COLUMN} < -{record['threshold']:g} "
        f"({QC_SCORE}: median {record['median']:.4g}, scale {record['scale']:.4g} nats per position)"
    )


def read_record(path: Path) -> dict:
    """The ``uns["score_qc"]`` record of a score output file."""
    with h5py.File(path, "r") as f:
        return read_elem(f["uns"][QC_KEY])


def run_score(config: RunConfig, score: ScoreConfig, *, dry_run: bool = False) -> Path:
    """Run ``transcriptformer score``: the score outputs of every cell, with the outlier columns, in one ``.h5ad``.

    Parameters
    ----------
    config
        The inference run that computes the scores (:meth:`ScoreConfig.inference_defaults` and the flags);
        its ``output_keys`` must hold ``mean_log_likelihood``.
    score
        The outlier rule.
    dry_run
        Print the plan of the inference run, write nothing.

    Returns
    -------
    Path
        The output file. Its obs holds the per-cell scores and the QC columns, ``uns["score_qc"]`` the rule as
        applied; the rest is as for ``transcriptformer inference`` (``docs/inference.md``).
    """
    score.check(config.inference)
    finish_obs = functools.partial(outlier_columns, threshold=score.outlier_threshold)
    path = run_inference(config, dry_run=dry_run, finish_obs=finish_obs)
    if not dry_run:
        print(describe(read_record(path)), flush=True)
    return path


def on_var(matrix: sp.csr_matrix, columns: np.ndarray, n_vars: int) -> sp.csr_matrix:
    """``matrix`` with its column ``i`` moved to column ``columns[i]`` of ``n_vars`` (``-1``: left out)."""
    entries = matrix.tocoo()
    moved = columns[entries.col]
    kept = moved >= 0
    return sp.csr_matrix(
        (entries.data[kept], (entries.row[kept], moved[kept])), shape=(matrix.shape[0], n_vars), dtype=matrix.dtype
    )


def var_positions(var_names: pd.Index, genes: pd.Index) -> np.ndarray:
    """Position of each of ``genes`` (var names of ``adata.raw``) among ``var_names``, ``-1`` where absent."""
    if not var_names.is_unique:
        raise ValueError(
            "the counts come from adata.raw and adata.var_names are not unique, so the per-gene scores cannot be "
            "placed on adata.var: call adata.var_names_make_unique() first, or pass use_raw=False"
        )
    return var_names.get_indexer(genes)


def write_to_anndata(adata: ad.AnnData, frame: pd.DataFrame, record: dict, gene_scores: sp.csr_matrix) -> None:
    """Store the scores of all cells of ``adata``: columns in obs, the rule in uns, the per-gene scores in layers.

    ``frame`` and ``gene_scores`` (``(n_obs, n_vars)``, on ``adata.var``) hold the cells in ``adata``'s order;
    ``record`` goes to ``uns["score_qc"]``.
    """
    for column in frame.columns:
        adata.obs[column] = frame[column].to_numpy()
    adata.uns[QC_KEY] = record
    adata.layers[GENE_SCORE_KEY] = gene_scores
