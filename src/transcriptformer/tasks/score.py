"""``score``: log-likelihoods per cell and per gene under the generative model, and likelihood outliers for QC.

The scores are outputs of the model (``log_likelihood*`` in :data:`~transcriptformer.model.outputs.OUTPUTS`),
computed by the one batch loop in the forward pass that computes the other outputs; ``docs/score.md`` defines them.
This task adds what a use of them needs:

* the QC rule (:func:`flag_outliers`): the robust z-score of each cell's ``mean_log_likelihood`` against the
  other cells scored with it, ``z = (x - median) / (1.4826 * MAD)``, and a flag for ``z < -threshold``; cells
  without a score (no counts: NaN) are neither flagged nor counted in the median and MAD;
* :class:`ScoreTask`: the engine's run of the score outputs (``transcriptformer score`` from files, and
  :meth:`TranscriptFormerModel.score <transcriptformer.api.TranscriptFormerModel.score>` in memory), whose
  output gets the outlier columns from all cells once every unit is done, and its summary line.

The command line reads :class:`ScoreConfig` before torch, so the heavy imports wait for a run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from transcriptformer.config import check_range
from transcriptformer.engine.config import RunConfig, default_output_path
from transcriptformer.engine.task import BatchLoopTask
from transcriptformer.model.outputs import OUTPUTS, SCORE_KEYS

if TYPE_CHECKING:
    import anndata as ad
    import scipy.sparse as sp

    from transcriptformer.engine.run import MemoryResult

# The per-cell score that the outlier rule reads, and the obs columns it adds.
QC_SCORE = "mean_log_likelihood"
ROBUST_Z_COLUMN = f"{QC_SCORE}_robust_z"
OUTLIER_COLUMN = "likelihood_outlier"
# uns key of the outlier rule as applied: its threshold, the median and scale it found, the cells it counted.
QC_KEY = "score_qc"
# The per-cell scores, in OUTPUTS order: the columns of TranscriptFormerModel.score's table before the QC columns.
CELL_SCORE_KEYS = tuple(key for key in SCORE_KEYS if OUTPUTS[key].level == "cell")
# The per-gene score that TranscriptFormerModel.score writes into an AnnData's layers.
GENE_SCORE_KEY = "gene_log_likelihood"
MAD_TO_SD = 1.4826  # scipy's scale="normal": the MAD of a normal distribution times this is its standard deviation


@dataclass
class ScoreConfig:
    """The settings of the score task.

    Attributes
    ----------
    outlier_threshold : float
        A cell is a likelihood outlier when the robust z-score of its ``mean_log_likelihood`` against the other
        cells of the run is below ``-outlier_threshold``.
    output_filename : str
        The score run's output file name; its other settings default as an inference run's.
    """

    outlier_threshold: float = 3.5
    output_filename: str = "scores.h5ad"

    def __post_init__(self) -> None:
        check_range(self, "", "outlier_threshold", above=0)

    def run_defaults(self) -> RunConfig:
        """The settings of a score run before flags change them: every score output, into ``output_filename``."""
        return RunConfig().replace(
            output_path=default_output_path("score"), output_filename=self.output_filename, output_keys=SCORE_KEYS
        )


@dataclass
class ScoreTask(BatchLoopTask):
    """The score outputs of every cell (the batch loop), then the outlier columns from all cells."""

    name: str = "score"
    settings: ScoreConfig = field(default_factory=ScoreConfig)

    def check(self, config: RunConfig) -> None:
        """Raise a ``ValueError`` when the run does not compute the score that the outlier rule reads."""
        keys = list(config.predict.output_keys)
        if QC_SCORE not in keys:
            raise ValueError(
                f"the likelihood outliers are found from {QC_SCORE}, which output_keys {keys} leaves out; add "
                f"{QC_SCORE} to them"
            )

    def added_obs_columns(self) -> tuple[str, ...]:
        """The QC columns."""
        return ROBUST_Z_COLUMN, OUTLIER_COLUMN

    def finish(self, obs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
        """:func:`flag_outliers` over every cell: the obs to write, and the rule as applied as ``uns["score_qc"]``."""
        obs, record = flag_outliers(obs, self.settings.outlier_threshold)
        return obs, {QC_KEY: record}

    def describe(self, uns: dict) -> list[str]:
        """One line about the outliers found."""
        return [describe(uns[QC_KEY])]

    def write_into(self, adata: ad.AnnData, result: MemoryResult) -> None:
        """The per-cell scores and QC columns into obs, the rule into uns, the per-gene scores into layers.

        The per-gene scores are placed on ``adata.var``: by position when the counts come from ``adata.X``, by
        name when they come from ``adata.raw`` (genes that only ``raw`` has are left out).
        """
        super().write_into(adata, result)
        if GENE_SCORE_KEY in result.outputs.gene_values:
            columns = var_positions(adata.var_names, result.genes_read) if result.from_raw else result.var_rows
            adata.layers[GENE_SCORE_KEY] = on_var(result.outputs.gene_values[GENE_SCORE_KEY], columns, adata.n_vars)


def robust_z(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Robust z-scores of ``values`` against their own median and scaled median absolute deviation.

    NaN values (cells without a score) get NaN and are left out of the median and MAD.

    Returns
    -------
    z, median, scale
        ``z = (values - median) / scale`` with ``scale = 1.4826 * MAD``; all NaN (with a warning) when fewer than
        two values are finite or they do not vary (``scale = 0``).
    """
    from scipy.stats import median_abs_deviation

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


def describe(record: dict) -> str:
    """One line about the outliers found (a ``uns["score_qc"]`` record)."""
    unscored = record["cells"] - record["cells_scored"]
    return (
        f"Scored {record['cells_scored']} of {record['cells']} cells"
        + (f" ({unscored} without counts: NaN scores, not flagged)" if unscored else "")
        + f"; {record['outliers']} flagged as {OUTLIER_COLUMN}: {ROBUST_Z_COLUMN} < -{record['threshold']:g} "
        f"({QC_SCORE}: median {record['median']:.4g}, scale {record['scale']:.4g} nats per position)"
    )


def on_var(matrix: sp.csr_matrix, columns: np.ndarray, n_vars: int) -> sp.csr_matrix:
    """``matrix`` with its column ``i`` moved to column ``columns[i]`` of ``n_vars`` (``-1``: left out)."""
    import scipy.sparse as sp

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
