"""``transcriptformer evaluate`` against cz-benchmarks 0.15.1 itself, task by task, on the bundled mouse brain cells.

Each task runs twice on the same embedding (the PCA baseline, computed by each side and compared first): through
cz-benchmarks' own task classes and through :mod:`transcriptformer.evaluation.tasks`.

cz-benchmarks does not install beside the project's dependencies (pip's resolver backtracks for over 15 minutes
between its boto3 and the soma extra's s3fs/aiobotocore), so it lives in a virtual environment of its own, whose
site-packages ``CZ_BENCHMARKS_SITE`` names: they are added after the project's, so that both sides run the same
numpy, scikit-learn and scanpy, and cz-benchmarks brings what only it needs (jax, scib-metrics, hnswlib, pydantic).
Without it (or with cz-benchmarks installed here) the tests are skipped with the command that runs them.
"""

import dataclasses
import os
import site

import numpy as np
import pandas as pd
import pytest

from conftest import DATA_DIR
from test_evaluate import DEMO, knock_out_screen
from test_evaluate import KNOCKED_OUT as KNOCKED_OUT_GENES
from transcriptformer.api import load
from transcriptformer.evaluation import tasks
from transcriptformer.evaluation.config import EvaluateConfig
from transcriptformer.evaluation.embeddings import pca_embedding, read_cells
from transcriptformer.evaluation.perturbation import (
    conditions_of,
    counts_of,
    match_controls,
    model_predictions,
    perturbation_expression_prediction,
    perturbation_truth,
)

CZ_SITE = "CZ_BENCHMARKS_SITE"
if os.environ.get(CZ_SITE):
    site.addsitedir(os.environ[CZ_SITE])  # appended: the project's own packages come first
cz = pytest.importorskip(
    "czbenchmarks.tasks",
    reason=f"cz-benchmarks is not installed: python3 -m venv /tmp/cz && /tmp/cz/bin/pip install cz-benchmarks==0.15.1, "
    f"then {CZ_SITE}=/tmp/cz/lib/pythonX.Y/site-packages pytest -m slow test/test_evaluate_cz.py",
)
from czbenchmarks.datasets import SingleCellPerturbationDataset  # noqa: E402
from czbenchmarks.datasets.types import Organism  # noqa: E402
from czbenchmarks.datasets.utils_single_cell import run_multicondition_dge_analysis  # noqa: E402
from czbenchmarks.tasks.clustering import ClusteringTaskInput  # noqa: E402
from czbenchmarks.tasks.embedding import EmbeddingTaskInput  # noqa: E402
from czbenchmarks.tasks.integration import BatchIntegrationTaskInput  # noqa: E402
from czbenchmarks.tasks.label_prediction import MetadataLabelPredictionTaskInput  # noqa: E402
from czbenchmarks.tasks.sequential import SequentialOrganizationTaskInput  # noqa: E402
from czbenchmarks.tasks.single_cell.cross_species_integration import (  # noqa: E402
    CrossSpeciesIntegrationTask,
    CrossSpeciesIntegrationTaskInput,
)
from czbenchmarks.tasks.single_cell.cross_species_label_prediction import (  # noqa: E402
    CrossSpeciesLabelPredictionTask,
    CrossSpeciesLabelPredictionTaskInput,
)
from czbenchmarks.tasks.single_cell.perturbation_expression_prediction import (  # noqa: E402
    PerturbationExpressionPredictionTask,
    PerturbationExpressionPredictionTaskInput,
)

pytestmark = pytest.mark.slow  # the seven comparisons: about ten minutes on two busy cores
MOUSE_BRAIN = DATA_DIR / "mouse_brain_1k.h5ad"
SEED = 42


@pytest.fixture(scope="module")
def mouse_brain():
    """The cells, their labels, and the PCA baseline of each side."""
    config = EvaluateConfig(data_file=str(MOUSE_BRAIN), label_key="cell_type")
    cells = read_cells(config)
    ours = pca_embedding(cells.adata, config).values
    theirs = cz.ClusteringTask(random_seed=SEED).compute_baseline(cells.adata.X)
    return config, cells, ours, theirs


def metric(results, name: str, **params) -> float:
    """The value of cz-benchmarks' metric ``name`` whose parameters include ``params``."""
    (value,) = [r.value for r in results if r.metric_type.value == name and params.items() <= r.params.items()]
    return float(value)


def test_the_pca_baseline_is_cz_benchmarks(mouse_brain):
    _, _, ours, theirs = mouse_brain
    assert ours.shape == theirs.shape == (1000, 50)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_label_prediction_equals_cz_benchmarks_fold_by_fold(mouse_brain):
    config, cells, ours, _ = mouse_brain
    task = cz.MetadataLabelPredictionTask(random_seed=SEED)
    output = task._run_task(ours, MetadataLabelPredictionTaskInput(labels=cells.labels))
    kept = tasks.predictable_cells(cells.labels, config.min_class_size, "cell_type")
    results = tasks.label_prediction(ours[kept], cells.labels[kept], config)
    for row in output.results:
        for score in tasks.SCORES:
            assert results[row["classifier"]][score][row["split"]] == pytest.approx(row[score], abs=1e-6)
    assert len(output.results) == 15


def test_clustering_and_embedding_equal_cz_benchmarks(mouse_brain):
    config, cells, ours, _ = mouse_brain
    obs = pd.DataFrame(index=cells.adata.obs_names)
    clustering = cz.ClusteringTask(random_seed=SEED).run(ours, ClusteringTaskInput(obs=obs, input_labels=cells.labels))
    mine = tasks.clustering(tasks.neighbor_graph(ours, config), cells.labels.to_numpy(), config.seed)
    assert mine["ari"] == pytest.approx(metric(clustering, "adjusted_rand_index"), abs=1e-6)
    assert mine["nmi"] == pytest.approx(metric(clustering, "normalized_mutual_info"), abs=1e-6)
    embedding = cz.EmbeddingTask(random_seed=SEED).run(ours, EmbeddingTaskInput(input_labels=cells.labels))
    silhouette = tasks.label_silhouette(ours, cells.labels.to_numpy())
    assert silhouette == pytest.approx(metric(embedding, "silhouette_score"), abs=1e-5)  # scib-metrics: float32


def two_groups(cells) -> np.ndarray:
    return np.where(np.random.default_rng(0).random(len(cells.labels)) < 0.5, "first", "second")


def test_batch_integration_equals_cz_benchmarks(mouse_brain):
    config, cells, ours, _ = mouse_brain
    batches = two_groups(cells)
    results = cz.BatchIntegrationTask(random_seed=SEED).run(
        ours, BatchIntegrationTaskInput(batch_labels=batches, labels=cells.labels)
    )
    every_cell = np.arange(len(ours))
    mine = tasks.batch_mixing(ours, cells.labels.to_numpy(), batches, every_cell, config)
    # cz-benchmarks' neighbours are hnswlib's approximate ones, these exact ones
    assert mine["entropy"] == pytest.approx(metric(results, "entropy_per_cell"), abs=1e-3)
    assert mine["batch_silhouette"] == pytest.approx(metric(results, "batch_silhouette"), abs=1e-5)


def test_cross_species_integration_equals_cz_benchmarks(mouse_brain):
    config, cells, ours, _ = mouse_brain
    species = two_groups(cells)
    first = species == "first"
    task_input = CrossSpeciesIntegrationTaskInput(
        labels=[cells.labels[first], cells.labels[~first]], organism_list=[Organism.HUMAN, Organism.MOUSE]
    )
    results = CrossSpeciesIntegrationTask(random_seed=SEED).run([ours[first], ours[~first]], task_input)
    order = np.concatenate([np.flatnonzero(first), np.flatnonzero(~first)])  # cz-benchmarks stacks the species
    labels = cells.labels.to_numpy()[order]
    mine = tasks.batch_mixing(ours[order], labels, species[order], np.arange(len(order)), config)
    assert mine["entropy"] == pytest.approx(metric(results, "entropy_per_cell"), abs=1e-3)
    assert mine["batch_silhouette"] == pytest.approx(metric(results, "batch_silhouette"), abs=1e-5)


def test_sequential_organisation_equals_cz_benchmarks(mouse_brain):
    config, cells, ours, _ = mouse_brain
    times = (pd.Categorical(cells.labels).codes % 4).astype(np.float64)  # four time points, tied to the cell types
    np.random.seed(SEED)  # cz-benchmarks draws its random expectation from numpy's global generator
    results = cz.SequentialOrganizationTask(random_seed=SEED).run(
        ours, SequentialOrganizationTaskInput(obs=pd.DataFrame(index=cells.adata.obs_names), input_labels=times)
    )
    mine = tasks.sequential_organisation(ours, times, config)
    assert mine["sequential_alignment"] == pytest.approx(metric(results, "sequential_alignment"), abs=1e-12)
    assert mine["silhouette_time"] == pytest.approx(metric(results, "silhouette_score"), abs=1e-5)
    assert 0.1 < mine["sequential_alignment"] < 1


@pytest.mark.parametrize("aggregation", ["none", "mean", "median"])
def test_cross_species_label_prediction_equals_cz_benchmarks(mouse_brain, aggregation):
    config, cells, ours, _ = mouse_brain
    top = cells.labels.isin(cells.labels.value_counts().index[:4]).to_numpy()  # the labels both halves have
    values, labels = ours[top], cells.labels[top].reset_index(drop=True)
    rng = np.random.default_rng(0)
    species = pd.Series(np.where(rng.random(len(labels)) < 0.5, "human", "mouse"))
    samples = pd.Series([f"{label}-{name}-{rng.integers(6)}" for label, name in zip(labels, species, strict=True)])
    samples = None if aggregation == "none" else samples
    chosen = config if samples is None else dataclasses.replace(config, sample_aggregation=aggregation)
    mine = tasks.cross_species_label_prediction(values, labels, species, samples, chosen)
    each = {name: (species == name).to_numpy() for name in ("human", "mouse")}
    task_input = CrossSpeciesLabelPredictionTaskInput(
        labels=[labels[cells].reset_index(drop=True) for cells in each.values()],
        organisms=[Organism.HUMAN, Organism.MOUSE],
        sample_ids=None if samples is None else [samples[cells].reset_index(drop=True) for cells in each.values()],
        aggregation_method=aggregation,
    )
    output = CrossSpeciesLabelPredictionTask(random_seed=SEED)._run_task([values[c] for c in each.values()], task_input)
    name = {str(Organism.HUMAN): "human", str(Organism.MOUSE): "mouse"}
    theirs = {
        (name[r["train_species"]], name[r["test_species"]], r["classifier"], r.get("split")): r for r in output.results
    }
    assert len(mine) == len(theirs) == 2 * 3 + 2 * 3 * 5  # transfers, and folds within each species
    for row in mine:
        expected = theirs[(row["train"], row["test"], row["classifier"], row.get("split"))]
        for score in tasks.SCORES:
            assert row[score] == pytest.approx(expected[score], abs=1e-6)


def test_perturbation_expression_prediction_equals_cz_benchmarks(tmp_path):
    """The demo model's perturb predictions on a simulated knock-out screen of real cells, judged by both sides.

    No Perturb-seq data is bundled (test_evaluate.knock_out_screen). Compared: the ground truth (differential
    expression, filters, drawn genes), then the Spearman correlation of every perturbation.
    """
    path = knock_out_screen(tmp_path / "screen.h5ad")
    key = "perturbation"
    config = EvaluateConfig(
        data_file=str(path), label_key="cell_type", perturbation_key=key, checkpoint_path=[str(DEMO)]
    )
    adata = read_cells(config).adata
    truth = perturbation_truth(adata, config)
    predictions = model_predictions(load(DEMO), adata, truth, config.batch_size)
    mine = perturbation_expression_prediction(truth, predictions)["conditions"]
    # cz-benchmarks' dataset of the same counts and matched controls: its differential expression, filters, draws
    conditions = adata.obs[key].set_axis(adata.obs_names)
    control_map = match_controls(conditions, conditions_of(conditions, "ctrl", key), "ctrl", SEED)
    counts = counts_of(adata)
    counts.obs[key] = conditions.to_numpy()
    de_results, _ = run_multicondition_dge_analysis(
        counts.copy(), key, "gene", {c: list(m.values()) for c, m in control_map.items()}, filter_min_genes=0
    )
    counts.uns["de_results_wilcoxon"] = de_results
    counts.uns["control_cells_map"] = control_map
    counts.write_h5ad(tmp_path / "dataset.h5ad")
    dataset = SingleCellPerturbationDataset(tmp_path / "dataset.h5ad", Organism.MOUSE, condition_key=key)
    dataset.load_data()
    assert dataset.target_conditions_dict == truth.targets
    theirs_de = dataset.de_results.rename(columns={key: "condition"}).reset_index(drop=True)
    pd.testing.assert_frame_equal(
        theirs_de, truth.de_results.reset_index(drop=True), check_dtype=False, check_exact=True
    )
    # the model's answer as cz-benchmarks takes it: a row per cell (a treated cell: its control knocked out)
    matrix = np.zeros((dataset.adata.n_obs, len(predictions.genes)))
    rows = dataset.adata.obs_names.get_indexer
    for cell, values in predictions.control.items():
        matrix[rows([cell])[0]] = values
    for condition, mapping in truth.control_map.items():
        for treated, control in mapping.items():
            matrix[rows([treated])[0]] = predictions.knocked_out[(condition, control)]
    task_input = PerturbationExpressionPredictionTaskInput(
        adata=dataset.adata, gene_index=predictions.genes, cell_index=dataset.adata.obs.index
    )
    results = PerturbationExpressionPredictionTask(random_seed=SEED).run(matrix, task_input)
    theirs = {r.params["condition"]: float(r.value) for r in results}
    assert sorted(theirs) == sorted(mine) == sorted(KNOCKED_OUT_GENES)
    difference = max(abs(mine[c]["spearman"] - theirs[c]) for c in theirs)
    print(f"perturbation-expression prediction: largest difference to cz-benchmarks {difference:.3g}")
    assert difference <= 1e-12
    assert all(mine[c]["genes"] >= 5 for c in mine)
