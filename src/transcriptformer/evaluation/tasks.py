"""The evaluation tasks, named like cz-benchmarks' tasks where they match, computed with scikit-learn and scanpy.

* label prediction: cz-benchmarks' classifier pipelines and defaults, 5-fold stratified cross-validation, plus a kNN
  without scaling;
* clustering: Leiden (igraph flavour) on the kNN graph of the embedding, compared with the labels (ARI, NMI);
* label silhouette (scIB's, rescaled to 0..1);
* batch mixing: entropy of the batches among each cell's neighbours, and scIB's batch silhouette;
* cross-species transfer: classifiers trained on the cells of one species, tested on another's.

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
from sklearn.model_selection import StratifiedKFold, cross_validate
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


def cross_species(
    values: np.ndarray, labels: pd.Series, species: pd.Series, config: EvaluateConfig
) -> list[dict[str, Any]]:
    """Classifiers trained on one species' cells and tested on another's, for each ordered pair of species.

    Like cz-benchmarks' ``CrossSpeciesLabelPredictionTask`` (same classifiers and scores), on the labels both
    species share: classes of at least ``min_class_size`` cells in the training species that the test species has.
    """
    results = []
    for train, test in itertools.permutations(sorted(species.unique()), 2):
        train_cells, test_cells = (species == train).to_numpy(), (species == test).to_numpy()
        counts = labels[train_cells].value_counts()
        shared = sorted(set(counts[counts >= config.min_class_size].index) & set(labels[test_cells]))
        if len(shared) < 2:
            say(f"{train}->{test}: {len(shared)} shared label(s) of {config.min_class_size}+ cells; transfer skipped")
            results.append({"train": train, "test": test, "shared_labels": len(shared)})
            continue
        train_cells &= labels.isin(shared).to_numpy()
        test_cells &= labels.isin(shared).to_numpy()
        codes = pd.Categorical(labels, categories=shared).codes
        for name, classifier in classifiers(config.seed, config.knn_neighbors).items():
            with default_iterations():
                fitted = clone(classifier).fit(values[train_cells], codes[train_cells])
            scores = {
                score: float(scorer(fitted, values[test_cells], codes[test_cells]))
                for score, scorer in scorers(len(shared)).items()
            }
            results.append({"train": train, "test": test, "shared_labels": len(shared), "classifier": name, **scores})
    return results


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
