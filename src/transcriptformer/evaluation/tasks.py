"""The evaluation tasks, named like cz-benchmarks' tasks where they match, computed with scikit-learn and scanpy.

* label prediction: cz-benchmarks' classifier pipelines and defaults, 5-fold stratified cross-validation, plus a kNN
  without scaling;
* clustering: Leiden (igraph flavour) on the kNN graph of the embedding, compared with the labels (ARI, NMI);
* label silhouette (scIB's, rescaled to 0..1);
* batch mixing: entropy of the batches among each cell's neighbours, and scIB's batch silhouette;
* cross-species integration (the batch metrics with the species as batches) and cross-species label prediction:
  classifiers trained on one species (or its samples' mean embeddings), tested on another, and cross-validated
  within each;
* sequential organisation: silhouette of the times, and how close in time each cell's neighbours are.

Every random choice takes the run's seed. The graph of Leiden and UMAP is scanpy's: exact neighbours below 8,192 cells,
approximate ones (pynndescent) above. Silhouettes and the batch entropy are averaged over at most ``sample_cells``
cells drawn with the seed, whose neighbours are searched exactly among all cells, so that their cost grows linearly
with the number of cells.

scib-metrics, which cz-benchmarks calls for the silhouettes, is not used: it needs jax and jaxlib (about 400 MB
more, measured with pip on Python 3.11) for two formulas that scikit-learn's ``silhouette_samples`` gives. The
functions below follow scib-metrics 0.5 (``silhouette_label``, ``silhouette_batch``) and cz-benchmarks
(``compute_entropy_per_cell``) line by line.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.base import ClassifierMixin, clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    f1_score,
    make_scorer,
    normalized_mutual_info_score,
    precision_score,
    recall_score,
    roc_auc_score,
    silhouette_samples,
)
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_validate
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from transcriptformer.console import say
from transcriptformer.errors import UserError
from transcriptformer.evaluation.config import EvaluateConfig
from transcriptformer.runtime import cpu_threads

UNSCALED_KNN = "knn_unscaled"
SCORES = ("accuracy", "f1", "precision", "recall", "auroc")
# Leiden as cz-benchmarks runs it (src/czbenchmarks/tasks/utils.py, cluster_embedding; tasks/constants.py).
LEIDEN_ITERATIONS = 2


def classifiers(seed: int, knn_neighbors: int) -> dict[str, ClassifierMixin]:
    """cz-benchmarks' label-prediction classifiers, and a kNN on the unscaled embedding.

    The first three are the pipelines of cz-benchmarks' ``MetadataLabelPredictionTask._run_task``
    (src/czbenchmarks/tasks/label_prediction.py, 0.15.1) with its defaults: logistic regression and a 5-neighbour kNN
    after ``StandardScaler(with_mean=False)`` (each dimension divided by its standard deviation, not centred), a
    random forest of 100 trees. Scaling every dimension to unit variance gives a low-variance
    (noise) dimension the weight of the first one, which misleads a distance-based kNN; the unscaled kNN measures
    the embedding's own geometry.
    """
    return {
        "lr": Pipeline([("scaler", StandardScaler(with_mean=False)), ("lr", LogisticRegression())]),
        "knn": Pipeline([("scaler", StandardScaler(with_mean=False)), ("knn", KNeighborsClassifier())]),
        # n_jobs changes the speed only: the trees are the same (runtime.cpu_threads: the idle CPUs)
        "rf": Pipeline([("rf", RandomForestClassifier(random_state=seed, n_jobs=cpu_threads()))]),
        UNSCALED_KNN: KNeighborsClassifier(n_neighbors=knn_neighbors),
    }


def scorers(n_classes: int) -> dict[str, Any]:
    """cz-benchmarks' scorers: accuracy, macro F1, precision and recall (binary for two classes), macro AUROC.

    A class never predicted has a precision of 0 (scikit-learn's ``zero_division`` default, which cz-benchmarks
    keeps), without scikit-learn's warning.
    """
    average = "binary" if n_classes == 2 else "macro"
    return {
        "accuracy": make_scorer(accuracy_score),
        "f1": make_scorer(f1_score, average=average),
        "precision": make_scorer(precision_score, average=average, zero_division=0),
        "recall": make_scorer(recall_score, average=average, zero_division=0),
        "auroc": make_scorer(roc_auc_score, average="macro", multi_class="ovr", response_method="predict_proba"),
    }


@contextlib.contextmanager
def default_iterations() -> Iterator[None]:
    """Without scikit-learn's warning when a logistic regression stops before converging.

    cz-benchmarks' ``LogisticRegression()`` keeps scikit-learn's 100 iterations; kept so that the numbers compare.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def predictable_cells(labels: pd.Series, min_class_size: int, what: str) -> np.ndarray:
    """Cells of the classes with at least ``min_class_size`` cells; at least two such classes are needed."""
    counts = labels.value_counts()
    kept = counts[counts >= min_class_size]
    if len(kept) < 2:
        largest = ", ".join(f"{name!r}: {count}" for name, count in counts.head(3).items())
        raise UserError(
            f"{what} has {len(kept)} class(es) of at least {min_class_size} cells ({largest}); label prediction "
            "needs two: choose a column with several labels (label_key)"
        )
    return labels.isin(kept.index).to_numpy()


def label_prediction(values: np.ndarray, labels: pd.Series, config: EvaluateConfig) -> dict[str, dict[str, list]]:
    """Per classifier and score, the score of each of ``n_folds`` stratified folds (cells of kept classes only)."""
    codes = pd.Categorical(labels).codes
    folds = StratifiedKFold(n_splits=config.n_folds, shuffle=True, random_state=config.seed)
    results = {}
    for name, classifier in classifiers(config.seed, config.knn_neighbors).items():
        with default_iterations():
            scores = cross_validate(classifier, values, codes, cv=folds, scoring=scorers(codes.max() + 1))
        results[name] = {score: scores[f"test_{score}"].tolist() for score in SCORES}
    return results


def neighbor_graph(values: np.ndarray, config: EvaluateConfig) -> ad.AnnData:
    """The cells with scanpy's kNN graph of ``values`` (``knn_neighbors``), the input of Leiden and UMAP."""
    import scanpy as sc

    graph = ad.AnnData(obs=pd.DataFrame(index=np.arange(len(values)).astype(str)), obsm={"X_emb": values})
    sc.pp.neighbors(graph, n_neighbors=config.knn_neighbors, use_rep="X_emb", random_state=config.seed)
    return graph


def clustering(graph: ad.AnnData, labels: pd.Series, seed: int) -> dict[str, float]:
    """Leiden clusters of the graph against the labels: ARI, NMI and the number of clusters."""
    import scanpy as sc

    sc.tl.leiden(graph, flavor="igraph", n_iterations=LEIDEN_ITERATIONS, random_state=seed)
    clusters = graph.obs["leiden"].to_numpy()
    return {
        "ari": float(adjusted_rand_score(labels, clusters)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "clusters": int(len(set(clusters))),
    }


def umap_coordinates(graph: ad.AnnData, seed: int) -> np.ndarray:
    """Two-dimensional UMAP layout of the graph (for the figures)."""
    import scanpy as sc

    sc.tl.umap(graph, random_state=seed)
    return graph.obsm["X_umap"]


def metric_sample(n_cells: int, config: EvaluateConfig) -> np.ndarray:
    """Cells over which silhouettes and the batch entropy are averaged: all, or ``sample_cells`` drawn with the seed."""
    if n_cells <= config.sample_cells:
        return np.arange(n_cells)
    return np.sort(np.random.default_rng(config.seed).choice(n_cells, config.sample_cells, replace=False))


def label_silhouette(values: np.ndarray, labels: np.ndarray) -> float:
    """The label silhouette of scIB: mean euclidean silhouette width of the labels, rescaled from -1..1 to 0..1."""
    return float((np.mean(silhouette_samples(values, labels)) + 1) / 2)


def batch_silhouette(values: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> float:
    """The batch silhouette of scIB: 1 is perfect mixing, 0 batches apart.

    Within each label, 1 - |silhouette of the batches| is averaged over the label's cells, then over labels. Labels
    with a single batch, or one cell per batch, are skipped as scIB does.
    """
    per_label = []
    for label in np.unique(labels):
        inside = labels == label
        n_batches = len(np.unique(batches[inside]))
        if n_batches in (1, inside.sum()):
            continue
        per_label.append(np.mean(1 - np.abs(silhouette_samples(values[inside], batches[inside]))))
    if not per_label:
        raise UserError("no label has cells of two batches: batch mixing cannot be measured with this batch_key")
    return float(np.mean(per_label))


def batch_entropy(values: np.ndarray, batches: np.ndarray, sample: np.ndarray, config: EvaluateConfig) -> float:
    """Mean over the sampled cells of the entropy of the batches among the cell's neighbours, over log(batches).

    1 when every neighbourhood holds the batches in equal parts (cz-benchmarks' ``compute_entropy_per_cell``, whose
    ``entropy_neighbors`` neighbours, the cell included, are searched among all cells, exactly, here).
    """
    names, codes = np.unique(batches, return_inverse=True)
    search = NearestNeighbors(n_neighbors=min(config.entropy_neighbors, len(values))).fit(values)
    neighbors = search.kneighbors(values[sample], return_distance=False)
    counts = np.stack([(codes[neighbors] == code).sum(axis=1) for code in range(len(names))], axis=1)
    shares = counts / counts.sum(axis=1, keepdims=True)
    logs = np.log(shares, out=np.zeros_like(shares), where=shares > 0)
    return float(np.mean(-(shares * logs).sum(axis=1) / np.log(len(names))))


def batch_mixing(
    values: np.ndarray, labels: np.ndarray, batches: np.ndarray, sample: np.ndarray, config: EvaluateConfig
) -> dict[str, float]:
    """Batch entropy and batch silhouette, averaged over the sampled cells."""
    return {
        "entropy": batch_entropy(values, batches, sample, config),
        "batch_silhouette": batch_silhouette(values[sample], labels[sample], batches[sample]),
    }


def check_batches(batches: pd.Series, what: str) -> None:
    """At least two batches (species) are needed to measure mixing (transfer)."""
    if batches.nunique() < 2:
        raise UserError(f"{what} holds a single value ({batches.iloc[0]!r}): name a column with two or more")


def sequential_organisation(values: np.ndarray, times: np.ndarray, config: EvaluateConfig) -> dict[str, float]:
    """cz-benchmarks' ``SequentialOrganizationTask``: silhouette of the times, and their sequential alignment.

    Both over every cell (as cz-benchmarks computes them), each distinct time a label of the silhouette.
    """
    return {
        "silhouette_time": label_silhouette(values, times),
        "sequential_alignment": sequential_alignment(values, times, config.sequential_neighbors, config.seed),
    }


def sequential_alignment(values: np.ndarray, times: np.ndarray, k: int, seed: int) -> float:
    """How close in time a cell's ``k`` nearest neighbours are: 1 - their mean time distance over a random one's.

    cz-benchmarks' ``sequential_alignment`` (src/czbenchmarks/metrics/utils.py, normalised, fixed ``k``), clipped
    to 0..1: 1 when every neighbour shares the cell's time, 0 when neighbours are no closer in time than random
    cells. The random expectation is drawn as cz-benchmarks draws it, from a ``RandomState`` seeded with ``seed``
    (cz-benchmarks draws from numpy's global one, unseeded: seeding that with ``seed`` gives the same value).
    """
    if len(values) < k + 1:
        raise UserError(f"sequential organisation needs more than {k} cells (sequential_neighbors); got {len(values)}")
    if len(np.unique(times)) == 1:
        return 1.0
    neighbors = NearestNeighbors(n_neighbors=k + 1).fit(values).kneighbors(values, return_distance=False)
    distance = np.mean(np.abs(times[:, None] - times[neighbors[:, 1:]]).mean(axis=1))
    expected = random_time_distance(times, k, np.random.RandomState(seed))
    return float(np.clip(1 - distance / expected, 0, 1)) if expected > 0 else 1.0


def random_time_distance(times: np.ndarray, k: int, rng: np.random.RandomState) -> float:
    """Mean time distance from a random cell to ``k`` other random cells, over ``min(10,000, 10 n)`` draws.

    cz-benchmarks' ``_compute_random_baseline``, draw for draw.
    """
    n = len(times)
    k = max(1, min(k, n - 1))
    draws = []
    for _ in range(min(10_000, n * 10)):
        cell = rng.randint(0, n)
        if k == n - 1:
            others = np.delete(np.arange(n), cell)
        else:
            choices = rng.choice(n - 1, size=k, replace=False)
            others = choices + (choices >= cell).astype(int)
        draws.append(np.mean(np.abs(times[cell] - times[others])))
    return float(np.mean(draws))


def cross_species_classifiers(seed: int) -> dict[str, ClassifierMixin]:
    """cz-benchmarks' ``CrossSpeciesLabelPredictionTask`` classifiers: centred scaling, 1,000 iterations of LR."""
    return {
        "lr": Pipeline([("scaler", StandardScaler()), ("lr", LogisticRegression(max_iter=1000, random_state=seed))]),
        "knn": Pipeline([("scaler", StandardScaler()), ("knn", KNeighborsClassifier(n_neighbors=5))]),
        "rf": Pipeline([("rf", RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=cpu_threads()))]),
    }


def aggregate_samples(
    values: np.ndarray, labels: pd.Series, samples: pd.Series, how: str = "mean"
) -> tuple[np.ndarray, pd.Series, pd.Series]:
    """Each sample's embedding (``how``: mean or median; samples sorted by name) and its first cell's label.

    cz-benchmarks' ``aggregate_cells_to_samples``.
    """
    frame = pd.DataFrame(values)
    frame["sample"] = samples.to_numpy()
    aggregated = frame.groupby("sample").agg(how)
    first = pd.Series(labels.to_numpy(), index=samples.to_numpy()).groupby(level=0).first().reindex(aggregated.index)
    return aggregated.to_numpy(), first.reset_index(drop=True), pd.Series(aggregated.index.to_numpy())


def cross_species_label_prediction(
    values: np.ndarray, labels: pd.Series, species: pd.Series, samples: pd.Series | None, config: EvaluateConfig
) -> list[dict[str, Any]]:
    """cz-benchmarks' ``CrossSpeciesLabelPredictionTask``: for every ordered pair of species, the classifiers.

    With ``samples``, each species' cells are first aggregated per sample (``sample_aggregation``: mean or median; the
    label of a sample is its first cell's).
    A species against itself is ``n_folds``-fold cross-validation (grouped by sample, so that no sample is on both
    sides); against another species, trained on one, tested on the other, on the training species' labels.
    """
    values, labels, species, samples = labels_in_every_species(values, labels, species, samples, config.n_folds)
    per_species = {}
    for name in sorted(species.unique()):
        cells = (species == name).to_numpy()
        if samples is None:
            per_species[name] = (values[cells], labels[cells].reset_index(drop=True), None)
        else:
            per_species[name] = aggregate_samples(
                values[cells], labels[cells], samples[cells], config.sample_aggregation
            )
    results = []
    for train, test in itertools.product(per_species, per_species):
        if train == test:
            results += cross_validated_species(*per_species[train], train, config)
        else:
            results += transferred_species(per_species[train][:2], per_species[test][:2], train, test, config)
    return results


def labels_in_every_species(
    values: np.ndarray, labels: pd.Series, species: pd.Series, samples: pd.Series | None, n_folds: int
) -> tuple[np.ndarray, pd.Series, pd.Series, pd.Series | None]:
    """The cells of the labels that every species has in ``n_folds`` samples (cells without ``samples``) or more.

    cz-benchmarks needs that (each fold of each species tests every label, each species is tested on the labels it
    was trained on) and fails otherwise; the other labels are left out here, and said.
    """
    cell = pd.Series(np.arange(len(labels)), index=labels.index)
    units = labels.astype(str) + "\0" + (samples if samples is not None else cell).astype(str)
    per_species = pd.DataFrame({"label": labels, "species": species, "unit": units}).drop_duplicates()
    counts = per_species.groupby(["label", "species"]).size().unstack(fill_value=0)
    kept = counts.index[(counts >= n_folds).all(axis=1)]
    if len(kept) < 2:
        raise UserError(
            f"{len(kept)} label(s) have {n_folds} or more {'samples' if samples is not None else 'cells'} in every "
            "species; cross-species label prediction needs two: name a label column that the species share (label_key)"
        )
    keep = labels.isin(kept).to_numpy()
    if not keep.all():
        say(f"cross-species label prediction: {len(counts) - len(kept)} label(s) not in every species left out")
    subset = (labels[keep], species[keep], None if samples is None else samples[keep])
    return values[keep], *subset


def cross_validated_species(
    values: np.ndarray, labels: pd.Series, groups: pd.Series | None, name: str, config: EvaluateConfig
) -> list[dict[str, Any]]:
    """The classifiers of one species, cross-validated (by sample when ``groups`` are given)."""
    kind = StratifiedKFold if groups is None else StratifiedGroupKFold
    folds = kind(n_splits=config.n_folds, shuffle=True, random_state=config.seed)
    codes = pd.Categorical(labels.astype(str)).codes
    score = scorers(codes.max() + 1)
    results = []
    for classifier, model in cross_species_classifiers(config.seed).items():
        for split, (train, test) in enumerate(folds.split(values, codes, groups=groups)):
            fitted = clone(model).fit(values[train], codes[train])
            scores = {key: float(scorer(fitted, values[test], codes[test])) for key, scorer in score.items()}
            results.append({"train": name, "test": name, "classifier": classifier, "split": split, **scores})
    return results


def transferred_species(
    train: tuple[np.ndarray, pd.Series], test: tuple[np.ndarray, pd.Series], train_name: str, test_name: str,
    config: EvaluateConfig,
) -> list[dict[str, Any]]:  # fmt: skip
    """The classifiers trained on one species and tested on another, whose labels the training species must have."""
    train_labels = pd.Categorical(train[1].astype(str))
    test_labels = pd.Categorical(test[1].astype(str), categories=train_labels.categories)
    unseen = sorted(set(test[1].astype(str)) - set(train_labels.categories))
    if unseen:
        raise UserError(
            f"species {test_name!r} has labels that {train_name!r} has not ({', '.join(unseen[:3])}): cross-species "
            "label prediction needs the same labels in every species; name a harmonised label column (label_key)"
        )
    score = scorers(len(train_labels.categories))
    results = []
    for classifier, model in cross_species_classifiers(config.seed).items():
        fitted = clone(model).fit(train[0], train_labels.codes)
        scores = {key: float(scorer(fitted, test[0], test_labels.codes)) for key, scorer in score.items()}
        results.append({"train": train_name, "test": test_name, "classifier": classifier, **scores})
    return results
