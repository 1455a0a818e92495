"""The cells to evaluate and the embeddings compared on them.

Embeddings come from ``obsm`` keys of the file, from checkpoints run in the same process through
:func:`transcriptformer.api.load` (with adapters), and from two baselines: PCA of the counts (the standard scanpy
workflow as cz-benchmarks runs it) and, per checkpoint, ``esm2ce`` (the mean of the gene-embedding rows of a cell's
genes, run through the same batch loop as the model).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from transcriptformer.api import TranscriptFormerModel, load
from transcriptformer.config import PredictConfig
from transcriptformer.console import say
from transcriptformer.data.hdf5 import open_hdf5
from transcriptformer.data.sources import H5AD, open_counts
from transcriptformer.engine.config import COUNTS_LAYER, EMBEDDING_ALIAS, EMBEDDING_KEY
from transcriptformer.engine.output import stored_obsm_key
from transcriptformer.errors import UserError, first_few
from transcriptformer.evaluation.config import EvaluateConfig
from transcriptformer.evaluation.perturbation import (
    PerturbationTruth,
    model_predictions,
    perturbation_expression_prediction,
    perturbation_truth,
)
from transcriptformer.pipeline import predict_positions

PCA_NAME = "pca"
# cz-benchmarks 0.15.1's tasks whose baseline is PCA of the counts (Task.compute_baseline); label prediction's own
# baseline is the raw expression matrix (MetadataLabelPredictionTask.compute_baseline), the cross-species tasks have
# none.
PCA_BASELINE_TASKS = ("clustering", "embedding", "batch integration", "sequential organisation")
PCA_BASELINE = (
    "PCA of the counts: cz-benchmarks' baseline of " + ", ".join(PCA_BASELINE_TASKS) + " (label prediction's is the "
    "raw expression matrix)"
)
# Where the commands of this package put cell embeddings, looked for when no method is named.
DEFAULT_OBSM_KEYS = (EMBEDDING_KEY, EMBEDDING_ALIAS)
ESM2CE_BASELINE = (
    "esm2ce: the mean of the checkpoint's ESM-2 gene-embedding rows over the cell's genes, the model without its "
    "transformer (not a cz-benchmarks baseline)"
)


@dataclass
class Embedding:
    """One representation of the cells.

    Attributes
    ----------
    name : str
        The method's name in the report.
    source : str
        Where it comes from, in words.
    values : ndarray
        ``(n_cells, dimensions)`` float32, one row per cell of the file.
    baseline : str
        For a baseline, what it is and which cz-benchmarks tasks use it; empty for an embedding under test.
    perturbation : dict or None
        For a checkpoint, when perturbed cells are given: its perturbation-expression prediction results.
    """

    name: str
    source: str
    values: np.ndarray
    baseline: str = ""
    perturbation: dict | None = None


@dataclass
class Cells:
    """The evaluated cells and their annotations, in the file's order.

    Attributes
    ----------
    adata : AnnData
        The file's cells.
    labels : Series
        The label of every cell, as strings.
    batches, species : Series or None
        The batch and species of every cell, as strings, when their columns are given.
    times : Series or None
        The time of every cell, as float64, when its column is given.
    samples : Series or None
        The sample of every cell, as strings, when its column is given.
    """

    adata: ad.AnnData
    labels: pd.Series
    batches: pd.Series | None
    species: pd.Series | None
    times: pd.Series | None = None
    samples: pd.Series | None = None

    def subset(self, keep: np.ndarray) -> Cells:
        """The cells where ``keep`` is true."""
        return Cells(
            self.adata[keep].copy(),
            self.labels[keep],
            *(
                None if column is None else column[keep]
                for column in (self.batches, self.species, self.times, self.samples)
            ),
        )


def read_cells(config: EvaluateConfig) -> Cells:
    """Read the file and its annotation columns; cells missing a label, batch or species are left out."""
    path = Path(config.data_file)
    if path.suffix.lower() != ".h5ad":
        raise ValueError(f"{path}: evaluate reads .h5ad files (the labels are obs columns); got {path.suffix!r}")
    open_hdf5(path, H5AD).close()  # a missing, truncated or foreign file is named with the fix
    adata = ad.read_h5ad(path)
    columns = {
        "label_key": config.label_key,
        "batch_key": config.batch_key,
        "species_key": config.species_key,
        "time_key": config.time_key,
        "sample_key": config.sample_key,
        "perturbation_key": config.perturbation_key,
    }
    given = {name: column for name, column in columns.items() if column is not None}
    for name, column in given.items():
        if column not in adata.obs:
            raise KeyError(
                f"{name} {column!r} is not an obs column of {path}; its columns: {first_few(list(adata.obs))}"
            )
    annotated = np.logical_and.reduce([adata.obs[column].notna().to_numpy() for column in given.values()])
    if not annotated.all():
        say(f"{int((~annotated).sum())} of {adata.n_obs} cells have no {' or '.join(given.values())}; left out")
    cells = Cells(
        adata,
        adata.obs[config.label_key].astype(str),
        adata.obs[config.batch_key].astype(str) if config.batch_key else None,
        adata.obs[config.species_key].astype(str) if config.species_key else None,
        numeric_times(adata.obs[config.time_key], config.time_key) if config.time_key else None,
        adata.obs[config.sample_key].astype(str) if config.sample_key else None,
    )
    return cells if annotated.all() else cells.subset(annotated)


def numeric_times(column: pd.Series, name: str) -> pd.Series:
    """The time column as float64 (numbers, or strings of numbers as cz-benchmarks accepts); one line otherwise."""
    values = column.astype(object) if isinstance(column.dtype, pd.CategoricalDtype) else column
    try:
        return pd.to_numeric(values, errors="raise").astype(np.float64)
    except (ValueError, TypeError):
        examples = ", ".join(repr(value) for value in pd.unique(column.dropna())[:3])
        raise UserError(
            f"time_key {name!r} is not numeric ({examples}, ...): sequential organisation needs ordered times; name a "
            "column of numbers (e.g. days or hours)"
        ) from None


def gather_embeddings(cells: Cells, config: EvaluateConfig) -> tuple[list[Embedding], dict[str, str]]:
    """Every embedding of the run, named uniquely: checkpoints, adapters, ``obsm`` keys, ``esm2ce``, PCA.

    Returns the embeddings and the baselines skipped, each with the reason (said as a warning too). With
    ``perturbation_key``, each checkpoint's ``perturb`` predictions are judged too (:mod:`.perturbation`): the ground
    truth is built first, so that its errors come before any model runs.

    Raises
    ------
    UserError
        When a checkpoint is named but the file holds no counts for it to read, or nothing is left to evaluate.
    """
    keys = config.obsm_key or default_obsm_keys(cells.adata, config)
    stored = list(obsm_embeddings(cells.adata, keys))  # checked before any model runs
    no_counts = why_not_counts(cells.adata)
    if no_counts and config.checkpoint_path:
        raise UserError(
            f"checkpoint_path needs the cells' counts, and {no_counts}: give data_file the counts that the model reads "
            "(e.g. the input file of that run, its labels in obs)"
        )
    truth = perturbation_truth(cells.adata, config) if config.perturbation_key else None
    skipped = {PCA_NAME: no_counts} if no_counts else {}
    for name, reason in skipped.items():
        warnings.warn(f"{name} baseline skipped: {reason}", stacklevel=2)
    if not stored and not config.checkpoint_path and skipped:
        raise UserError(
            f"nothing to evaluate: {skipped[PCA_NAME]}, and no embedding was named or found in obsm "
            f"({', '.join(DEFAULT_OBSM_KEYS)}): give obsm_key or checkpoint_path"
        )
    pca = [] if skipped else [pca_embedding(cells.adata, config)]  # and the counts, by the baseline needing fewest
    embeddings = [*checkpoint_embeddings(cells.adata, config, truth), *stored, *pca]
    seen: dict[str, int] = {}
    for embedding in embeddings:
        seen[embedding.name] = seen.get(embedding.name, 0) + 1
        if seen[embedding.name] > 1:
            embedding.name = f"{embedding.name}#{seen[embedding.name]}"
    return embeddings, skipped


def default_obsm_keys(adata: ad.AnnData, config: EvaluateConfig) -> list[str]:
    """With no method named, the first of :data:`DEFAULT_OBSM_KEYS` in the file's ``obsm``, when there is one."""
    if config.checkpoint_path:
        return []
    found = [key for key in DEFAULT_OBSM_KEYS if key in adata.obsm]
    if found:
        say(f"evaluating obsm[{found[0]!r}] (no obsm_key or checkpoint_path given)")
    return found[:1]


def why_not_counts(adata: ad.AnnData) -> str:
    """Why the file holds no counts that a baseline or a model can read; ``""`` when it does.

    The counts are ``raw.X`` when present, else ``X``. A file written by a ``transcriptformer`` command (it carries
    ``uns["transcriptformer"]``) whose ``X`` is one of its layers holds the model's outputs there (``mu``, per-gene
    log-likelihoods, generated counts), not the cells' measured counts.
    """
    if adata.raw is not None:
        return ""
    if adata.X is None or adata.n_vars == 0:
        return "the file has no genes (no X, no raw.X), as an inference output holds embeddings only"
    layer = layer_in_x(adata) if "transcriptformer" in adata.uns else None
    if layer is not None:
        return f"X holds the model's {layer!r} output (a transcriptformer output file), not the cells' counts"
    return ""


def layer_in_x(adata: ad.AnnData) -> str | None:
    """The model output layer that ``X`` equals (the output files keep their main layer as ``X``), if any.

    The counts layer of a ``keep_counts`` output is the input's counts, not a model output.
    """
    for key, layer in adata.layers.items():
        if key == COUNTS_LAYER or layer.shape != adata.X.shape:
            continue
        if sp.issparse(layer) or sp.issparse(adata.X):
            if (sp.csr_matrix(layer) != sp.csr_matrix(adata.X)).nnz == 0:
                return key
        elif np.array_equal(layer, adata.X):
            return key
    return None


def obsm_embeddings(adata: ad.AnnData, keys: list[str]) -> Iterator[Embedding]:
    """The embeddings stored under ``keys`` of ``adata.obsm`` (``X_transcriptformer`` and ``embeddings`` alike)."""
    for key in keys:
        stored = stored_obsm_key(adata.obsm, key)
        if stored is None:
            available = first_few(list(adata.obsm)) or "none"
            raise KeyError(f"obsm_key {key!r} is not in the file's obsm (its keys: {available})")
        yield Embedding(key, f"obsm[{stored!r}]", stored_embedding(adata, stored))


def stored_embedding(adata: ad.AnnData, key: str) -> np.ndarray:
    """``adata.obsm[key]`` as float32, once known to be an embedding that the tasks can use.

    Raises
    ------
    UserError
        When it is not a table of real numbers with a column or more, holds infinite values (or values beyond
        float32), or is NaN for every cell.
    """
    values = adata.obsm[key]
    values = values.toarray() if hasattr(values, "toarray") else np.asarray(values)
    fix = "give obsm_key the key of a cell embedding (one row of numbers per cell)"
    if values.ndim != 2 or values.shape[1] == 0:
        raise UserError(f"obsm_key {key!r} holds an array of shape {values.shape}, not an embedding: {fix}")
    if values.dtype.kind not in "biuf":
        raise UserError(f"obsm_key {key!r} holds {values.dtype} values, not real numbers: {fix}")
    with np.errstate(over="ignore"):
        values = values.astype(np.float32)
    if np.isinf(values).any():
        raise UserError(f"obsm_key {key!r} holds infinite values (or values beyond float32): {fix}")
    if np.isnan(values).any(axis=1).all():
        raise UserError(f"obsm_key {key!r} is NaN for every cell: {fix}")
    return values


def checkpoint_embeddings(
    adata: ad.AnnData, config: EvaluateConfig, truth: PerturbationTruth | None
) -> Iterator[Embedding]:
    """For each checkpoint: its embeddings (and perturbation predictions), with each adapter, its ``esm2ce``."""
    for path in config.checkpoint_path:
        name = Path(path).name or str(path)
        say(f"embedding the cells with {path}")
        model = load(path, device=config.device)
        embedding = Embedding(name, f"checkpoint {path}", model_embedding(model, adata, config.batch_size))
        if truth is not None:
            say(f"perturbing the matched control cells with {path}")
            predictions = model_predictions(model, adata, truth, config.batch_size)
            embedding.perturbation = perturbation_expression_prediction(truth, predictions)
        yield embedding
        esm2ce = esm2ce_embedding(model, adata, config)
        yield Embedding(f"esm2ce:{name}", f"esm2ce baseline of {path}", esm2ce, ESM2CE_BASELINE)
        for adapter in config.adapter:
            say(f"embedding the cells with {path} and the adapters {adapter}")
            adapted = load(path, device=config.device, adapter=adapter)
            yield Embedding(
                f"{name}+{Path(adapter).name}",
                f"checkpoint {path} with adapters {adapter}",
                model_embedding(adapted, adata, config.batch_size),
            )


def model_embedding(model: TranscriptFormerModel, adata: ad.AnnData, batch_size: int) -> np.ndarray:
    """The model's cell embeddings of every cell of ``adata``."""
    return model.embed(adata, key_added=None, batch_size=batch_size)


def esm2ce_embedding(model: TranscriptFormerModel, adata: ad.AnnData, config: EvaluateConfig) -> np.ndarray:
    """The ``esm2ce`` baseline of the model's checkpoint, through the batch loop that runs the model."""
    settings = PredictConfig(("embeddings",), batch_size=config.batch_size)
    esm2ce = model.checkpoint.esm2ce()
    return predict_positions(esm2ce, model.tokenize(adata), settings, model.device)["embeddings"]


def pca_embedding(adata: ad.AnnData, config: EvaluateConfig) -> Embedding:
    """PCA of the counts: library-size normalisation, log1p, highly variable genes, ``n_pcs`` components.

    cz-benchmarks' PCA baseline (``Task.compute_baseline`` and ``run_standard_scrna_workflow`` of
    src/czbenchmarks/tasks/, 0.15.1) step by step, on the same dense float32 counts: ``normalize_total`` to the
    median count, ``log1p``, ``highly_variable_genes`` (seurat flavour; scanpy keeps every gene with a dispersion
    when the file has fewer than ``n_top_genes``), PCA. The counts are densified as cz-benchmarks does: scanpy's PCA
    of a sparse matrix takes another path, whose components differ by up to 1e-3.
    """
    import scanpy as sc

    say("PCA baseline")
    fix = "give data_file the cells' counts (raw.X or X), beside the labels"
    if adata.X is None and adata.raw is None:
        raise UserError(f"data_file has no counts (no X, no raw.X), which the PCA baseline needs: {fix}")
    with open_counts(adata) as reader:
        dense = reader.rows(0, reader.n_obs).toarray().astype(np.float32, copy=False)
        counts = ad.AnnData(dense, var=pd.DataFrame(index=reader.var.index))
    if counts.n_vars < 2 or counts.X.sum() == 0:
        raise UserError(f"data_file has {counts.n_vars} gene(s) and {counts.X.sum():g} counts: too few for PCA: {fix}")
    counts.var_names_make_unique()
    sc.pp.normalize_total(counts)
    sc.pp.log1p(counts)
    with warnings.catch_warnings():  # n_top_genes above the number of genes: all of them, as scanpy says
        warnings.simplefilter("ignore", UserWarning)
        sc.pp.highly_variable_genes(counts, n_top_genes=config.n_top_genes)
    counts = counts[:, counts.var["highly_variable"]].copy()
    n_pcs = min(config.n_pcs, min(counts.shape) - 1)
    sc.pp.pca(counts, n_comps=n_pcs, random_state=config.seed)
    return Embedding(
        PCA_NAME,
        f"PCA: normalize_total, log1p, {counts.n_vars} highly variable genes, {n_pcs} components",
        counts.obsm["X_pca"],
        PCA_BASELINE,
    )


def cells_with_every_embedding(embeddings: list[Embedding]) -> np.ndarray:
    """Cells that every method embeds (a cell with none of a checkpoint's genes gets NaN); errors for ``inf``."""
    keep = np.ones(len(embeddings[0].values), bool)
    for embedding in embeddings:
        finite_or_nan = np.isfinite(embedding.values) | np.isnan(embedding.values)
        if not finite_or_nan.all():
            raise UserError(f"{embedding.source} holds infinite values; recompute it")
        embedded = ~np.isnan(embedding.values).any(axis=1)
        if not embedded.any():
            raise UserError(f"{embedding.source} embeds none of the {len(keep)} cells (all NaN): is it the right one?")
        keep &= embedded
    return keep
