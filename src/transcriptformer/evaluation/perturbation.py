"""cz-benchmarks 0.15.1's perturbation-expression prediction, answered by ``transcriptformer perturb``.

The cells are control cells (``control_value`` in the ``perturbation_key`` column) and perturbed ones, whose value
names the gene(s) perturbed (a symbol or Ensembl id; ``A+B`` for several), as in a Perturb-seq experiment.

The ground truth is built as cz-benchmarks builds its perturbation datasets (src/czbenchmarks/datasets/, 0.15.1):

* each perturbed cell is matched to one control cell (cz-benchmarks' ``control_cells_map``, a strict 1-1 map from
  treated to control cells): here controls drawn with the seed, without replacement while there are enough;
* per condition of at least :data:`MIN_PERTURBED_CELLS` cells, differential expression of its cells against their
  matched controls (``run_multicondition_dge_analysis``: genes in at least :data:`DE_MIN_CELLS` cells,
  ``normalize_total`` to 10,000, ``log1p``, scanpy's Wilcoxon test); no filter on genes per cell (cz-benchmarks'
  default of 1,000 is made for full-transcriptome screens, and would drop every cell of a smaller panel);
* the genes with an adjusted p-value below :data:`PVAL_THRESHOLD` and an absolute log fold change of at least
  :data:`MIN_LOGFOLDCHANGE` (``load_and_filter_deg_results``), of which half are drawn per condition with the seed, when
  that is at least :data:`MIN_DE_GENES_TO_MASK` (``sample_de_genes``).

The model's answer is ``perturb``'s: every condition's genes knocked out of each matched control cell. A treated
cell's predicted expression is the expected counts ``mu`` of its control cell with the genes knocked out
(``mu`` before plus ``perturb``'s ``delta_mu``; 0 for the genes knocked out and for genes the cell does not express),
a control cell's is its ``mu``. The metric is ``PerturbationExpressionPredictionTask``'s: per condition, the
Spearman correlation over the drawn genes between the true log fold change and the predicted change, the log ratio
of the mean predictions of the treated and of the control cells (their difference when a mean is not positive, for
the whole condition, as cz-benchmarks does); 0 where the correlation is undefined.

cz-benchmarks defines no baseline for this task (its ``compute_baseline`` raises ``NotImplementedError``).
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import spearmanr

from transcriptformer.api import TranscriptFormerModel
from transcriptformer.console import say
from transcriptformer.data.sources import open_counts
from transcriptformer.errors import UserError
from transcriptformer.evaluation.config import EvaluateConfig

# cz-benchmarks 0.15.1's defaults: SingleCellPerturbationDataset and run_multicondition_dge_analysis.
PVAL_THRESHOLD = 1e-4
MIN_LOGFOLDCHANGE = 1.0
PERCENT_GENES_TO_MASK = 0.5
MIN_DE_GENES_TO_MASK = 5
MIN_PERTURBED_CELLS = 50
DE_MIN_CELLS = 10
DE_TARGET_SUM = 1e4
EPS = 1e-8  # PerturbationExpressionPredictionTask's guard of the log ratio
BASELINE = "none: cz-benchmarks 0.15.1 defines no baseline for perturbation-expression prediction"


@dataclass
class PerturbationTruth:
    """What the model is judged against, as cz-benchmarks' dataset holds it.

    Attributes
    ----------
    control_map : dict
        Condition -> {treated cell name: matched control cell name}, for the conditions kept.
    de_results : DataFrame
        The differential expression kept: ``condition``, ``gene_id`` (var name), ``logfoldchange``.
    targets : dict
        Condition -> the genes drawn for it (var names).
    """

    control_map: dict[str, dict[str, str]]
    de_results: pd.DataFrame
    targets: dict[str, list[str]]


def counts_of(adata: ad.AnnData) -> ad.AnnData:
    """The cells' counts (``raw.X`` when present, else ``X``) as an AnnData indexed like ``adata``."""
    with open_counts(adata) as reader:
        counts = reader.rows(0, reader.n_obs).tocsr().astype(np.float32)
        var = pd.DataFrame(index=reader.var.index.astype(str))
    return ad.AnnData(counts, obs=pd.DataFrame(index=adata.obs_names.astype(str)), var=var)


def conditions_of(conditions: pd.Series, control_value: str, key: str) -> list[str]:
    """The perturbed conditions, in order of appearance; one line when there are no controls or none perturbed."""
    values = conditions.astype(str)
    if not (values == control_value).any():
        examples = ", ".join(repr(v) for v in pd.unique(values)[:3])
        raise UserError(
            f"perturbation_key {key!r} has no control cells (control_value {control_value!r}; its values: {examples}, "
            "...): name the value of the control cells (control_value)"
        )
    perturbed = [value for value in pd.unique(values) if value != control_value]
    if not perturbed:
        raise UserError(f"perturbation_key {key!r} holds control cells only: perturbation needs perturbed cells too")
    return perturbed


def match_controls(
    conditions: pd.Series, perturbed: list[str], control_value: str, seed: int
) -> dict[str, dict[str, str]]:
    """Each perturbed cell matched to a control cell drawn with ``seed`` (without replacement while enough)."""
    names = conditions.index.astype(str)
    controls = names[(conditions.astype(str) == control_value).to_numpy()]
    rng = np.random.default_rng(seed)
    matched = {}
    for condition in perturbed:
        treated = names[(conditions.astype(str) == condition).to_numpy()]
        drawn = rng.choice(len(controls), size=len(treated), replace=len(treated) > len(controls))
        matched[condition] = dict(zip(treated, controls[drawn], strict=True))
    return matched


def differential_expression(counts: ad.AnnData, control_map: dict[str, dict[str, str]], key: str) -> pd.DataFrame:
    """cz-benchmarks' ``run_multicondition_dge_analysis``: each condition's cells against their matched controls."""
    import scanpy as sc

    results = []
    for condition, mapping in control_map.items():
        if len(mapping) < MIN_PERTURBED_CELLS:
            say(f"perturbation {condition!r}: {len(mapping)} cells, under {MIN_PERTURBED_CELLS}; left out")
            continue
        treated = counts[counts.obs_names.get_indexer_for(list(mapping))].copy()
        control = counts[counts.obs_names.get_indexer_for(list(mapping.values()))].copy()
        treated.obs["comparison_group"] = condition
        control.obs["comparison_group"] = "control"
        merged = ad.concat([treated, control], index_unique=None).copy()
        sc.pp.filter_genes(merged, min_cells=DE_MIN_CELLS)
        sc.pp.normalize_total(merged, target_sum=DE_TARGET_SUM)
        sc.pp.log1p(merged)
        sc.tl.rank_genes_groups(
            merged, groupby="comparison_group", reference="control", method="wilcoxon", key_added="dge_results"
        )
        table = sc.get.rank_genes_groups_df(merged, group=condition, key="dge_results")
        table[key] = condition
        results.append(table)
    if not results:
        raise UserError(
            f"no perturbation has {MIN_PERTURBED_CELLS} cells or more, which differential expression needs (as in "
            "cz-benchmarks)"
        )
    names = {"names": "gene_id", "logfoldchanges": "logfoldchange", "pvals_adj": "pval_adj"}
    return pd.concat(results, ignore_index=True).rename(columns=names)[[key, "gene_id", "logfoldchange", "pval_adj"]]


def significant(de_results: pd.DataFrame) -> pd.DataFrame:
    """cz-benchmarks' ``load_and_filter_deg_results``: adjusted p-value and log fold change thresholds."""
    keep = (de_results["pval_adj"] < PVAL_THRESHOLD) & (de_results["logfoldchange"].abs() >= MIN_LOGFOLDCHANGE)
    if not keep.any():
        raise UserError(
            f"no gene is differentially expressed between perturbed and control cells (adjusted p-value under "
            f"{PVAL_THRESHOLD:g}, |log fold change| {MIN_LOGFOLDCHANGE:g} or more): nothing to predict"
        )
    return de_results[keep].drop(columns="pval_adj")


def draw_targets(de_results: pd.DataFrame, key: str, seed: int) -> dict[str, list[str]]:
    """cz-benchmarks' ``sample_de_genes``: a share of each condition's genes, drawn as it draws them."""
    rng = np.random.RandomState(seed)  # cz-benchmarks seeds numpy's global generator: the same draws
    targets = {}
    for condition in de_results[key].unique():
        genes = de_results.loc[de_results[key] == condition, "gene_id"].to_numpy()
        size = int(len(genes) * PERCENT_GENES_TO_MASK)
        if size >= MIN_DE_GENES_TO_MASK:
            targets[condition] = rng.choice(genes, size=size, replace=False).tolist()
    return targets


def perturbation_truth(adata: ad.AnnData, config: EvaluateConfig) -> PerturbationTruth:
    """The ground truth of the cells (see the module docstring)."""
    key = config.perturbation_key
    conditions = adata.obs[key].set_axis(adata.obs_names.astype(str))
    perturbed = conditions_of(conditions, config.control_value, key)
    control_map = match_controls(conditions, perturbed, config.control_value, config.seed)
    say(f"perturbation ground truth: differential expression of {len(perturbed)} perturbation(s)")
    de_results = significant(differential_expression(counts_of(adata), control_map, key))
    targets = draw_targets(de_results, key, config.seed)
    if not targets:
        raise UserError(
            f"no perturbation has {2 * MIN_DE_GENES_TO_MASK} differentially expressed genes or more, of which half are "
            "predicted (as in cz-benchmarks): nothing to predict"
        )
    return PerturbationTruth(
        {c: control_map[c] for c in targets}, de_results.rename(columns={key: "condition"}), targets
    )


@dataclass
class Predictions:
    """The model's expected counts of the matched control cells, before and after each knock-out.

    Attributes
    ----------
    genes : Index
        Var names of the columns (the file's genes that the model reads).
    control : dict
        Control cell name -> its row of ``mu``.
    knocked_out : dict
        (condition, control cell name) -> its row of ``mu`` with the condition's genes knocked out.
    """

    genes: pd.Index
    control: dict[str, np.ndarray]
    knocked_out: dict[tuple[str, str], np.ndarray]


def model_predictions(
    model: TranscriptFormerModel, adata: ad.AnnData, truth: PerturbationTruth, batch_size: int
) -> Predictions:
    """``perturb`` on the matched control cells, every condition's genes knocked out, and their own ``mu``."""
    from transcriptformer.model.outputs import PERTURBATION_KEYS
    from transcriptformer.tasks.embed import EmbedTask
    from transcriptformer.tasks.perturb import PerturbConfig, PerturbTask

    conditions = list(truth.targets)
    controls = sorted({cell for mapping in truth.control_map.values() for cell in mapping.values()})
    cells = adata[adata.obs_names.get_indexer_for(controls)].copy()
    before = model.run_task(EmbedTask(), cells, {"output_keys": ["mu"], "batch_size": batch_size})
    mu = sp.csr_matrix(before.outputs.gene_values["mu"], dtype=np.float64)
    row_of = {str(name): row for row, name in enumerate(before.obs.index)}
    task = PerturbTask(settings=PerturbConfig(knock_out=tuple(conditions), top_genes=1))
    perturbed = model.run_task(task, cells, {"output_keys": list(PERTURBATION_KEYS), "batch_size": batch_size})
    columns = pd.Index(before.gene_ids.astype(str)).get_indexer(perturbed.gene_ids.astype(str))
    delta = sp.csr_matrix(perturbed.outputs.gene_values["delta_mu"], dtype=np.float64)
    ids = pd.Index(before.gene_ids.astype(str))
    knocked_out = {}
    for row, (code, cell) in enumerate(
        zip(perturbed.obs["perturbation"].cat.codes, perturbed.obs["cell"], strict=True)
    ):
        values = mu[row_of[str(cell)]].toarray().ravel()
        change = delta[row]
        values[columns[change.indices]] += change.data
        removed = ids.get_indexer(list(task.perturbations[code].gene_ids))
        values[removed[removed >= 0]] = 0.0
        knocked_out[(conditions[code], str(cell))] = values
    control = {cell: mu[row].toarray().ravel() for cell, row in row_of.items()}
    return Predictions(pd.Index(before.genes_read.astype(str)), control, knocked_out)


def predicted_change(treated: np.ndarray, control: np.ndarray) -> tuple[np.ndarray, str]:
    """Log ratio of the mean predictions, or their difference when a mean is not positive (cz-benchmarks' rule)."""
    treated_mean, control_mean = treated.mean(axis=0), control.mean(axis=0)
    if np.any(treated_mean <= 0) or np.any(control_mean <= 0):
        return treated_mean - control_mean, "difference"
    return np.log((treated_mean + EPS) / (control_mean + EPS)), "ratio"


def spearman(true: np.ndarray, predicted: np.ndarray) -> float:
    """Spearman correlation, 0 where it is undefined (a constant vector), as cz-benchmarks reports it."""
    value = spearmanr(true, predicted).statistic
    return 0.0 if np.isnan(value) else float(value)


def perturbation_expression_prediction(truth: PerturbationTruth, predictions: Predictions) -> dict:
    """Per condition: the Spearman correlation of true and predicted changes over its drawn genes."""
    de = truth.de_results
    results = {}
    for condition, genes in truth.targets.items():
        table = de[de["condition"] == condition].set_index("gene_id")
        candidates = [gene for gene in genes if gene in table.index]
        true = table["logfoldchange"].reindex(candidates).to_numpy()
        columns = predictions.genes.get_indexer(np.asarray(candidates)[~np.isnan(true)])
        true = true[~np.isnan(true)][columns >= 0]
        columns = columns[columns >= 0]
        if not len(columns):
            continue
        mapping = truth.control_map[condition]
        treated = np.stack([predictions.knocked_out[(condition, cell)][columns] for cell in mapping.values()])
        control = np.stack([predictions.control[cell][columns] for cell in mapping.values()])
        change, operation = predicted_change(treated, control)
        results[condition] = {
            "spearman": spearman(true, change),
            "genes": len(columns),
            "cells": len(mapping),
            "operation": operation,
        }
    if not results:
        raise UserError("none of the differentially expressed genes is a gene that the model reads: nothing to predict")
    return {
        "mean_spearman": float(np.mean([r["spearman"] for r in results.values()])),
        "conditions": results,
        "baseline": BASELINE,
    }
