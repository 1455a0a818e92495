"""``transcriptformer evaluate`` on the bundled labelled cells: metrics, baselines, report, determinism, errors.

The commands run in-process through :func:`transcriptformer.cli.main`, so that scanpy's neighbour search is compiled
(numba) once for the whole module.
"""

import contextlib
import io
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib.image import imread

from conftest import DATA_DIR
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.cli import main
from transcriptformer.evaluation.config import EvaluateConfig
from transcriptformer.evaluation.embeddings import pca_embedding, read_cells
from transcriptformer.evaluation.report import METRICS_FIGURE, RESULTS_FILE, UMAP_FIGURE
from transcriptformer.evaluation.tasks import (
    SCORES,
    batch_entropy,
    batch_silhouette,
    label_prediction,
    label_silhouette,
    predictable_cells,
)
from transcriptformer.model.lora import add_lora_adapters, save_adapters
from transcriptformer.training.config import LoraConfig

MOUSE_BRAIN = DATA_DIR / "mouse_brain_1k.h5ad"
PBMC = DATA_DIR / "pbmc3k_counts.h5ad"
DEMO = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"


def evaluate(*args) -> tuple[int, str, str]:
    """Run ``transcriptformer evaluate ARGS`` in-process; its exit code and what it printed on stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["evaluate", *map(str, args), "--quiet"])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def mouse_cells(tmp_path_factory) -> Path:
    """The 1,000 mouse brain cells, a random embedding in obsm (chance level), two halves standing in for species.

    The first cell has no counts: the model cannot embed it.
    """
    cells = ad.read_h5ad(MOUSE_BRAIN)
    counts = cells.X.toarray()
    counts[0] = 0
    cells.X = sp.csr_matrix(counts)
    rng = np.random.default_rng(0)
    cells.obsm["X_random"] = rng.normal(size=(cells.n_obs, 16)).astype(np.float32)
    cells.obs["half"] = np.where(rng.random(cells.n_obs) < 0.5, "first", "second")
    path = tmp_path_factory.mktemp("mouse") / "mouse_brain.h5ad"
    cells.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def fresh_adapters(tmp_path_factory) -> Path:
    """LoRA adapters of the demo model as finetune starts them: their update is zero, an exact identity."""
    model = add_lora_adapters(load_checkpoint(DEMO).model, LoraConfig(r=2), str(DEMO))
    return save_adapters(model, tmp_path_factory.mktemp("adapters") / "fresh")


@pytest.fixture(scope="module")
def demo_report(mouse_cells, fresh_adapters, tmp_path_factory) -> tuple[str, dict, Path]:
    """The demo checkpoint with and without adapters, an obsm key, the baselines; batch mixing and transfer."""
    output = tmp_path_factory.mktemp("report") / "evaluation"
    code, printed, warned = evaluate(
        "--data-file", mouse_cells, "--label-key", "cell_type", "--checkpoint-path", DEMO, "--adapter", fresh_adapters,
        "--obsm-key", "X_random", "--batch-key", "tissue", "--species-key", "half", "--output-path", output,
    )  # fmt: skip
    assert code == 0, printed + warned
    left_out = "transcriptformer evaluate: warning: 1 cells have no embedding for some method"
    assert any(line.startswith(left_out) for line in warned.splitlines()), warned
    return printed, json.loads((output / RESULTS_FILE).read_text()), output


@pytest.mark.slow  # the demo_report fixture: two minutes or more on two cores
def test_the_demo_model_an_obsm_key_and_the_baselines_side_by_side(demo_report, fresh_adapters):
    printed, results, _ = demo_report
    methods = ["demo-mouse-brain", "esm2ce:demo-mouse-brain", "demo-mouse-brain+fresh", "X_random", "pca"]
    assert list(results["methods"]) == methods
    header = printed.splitlines()[0].split()
    assert header == methods
    base, adapted = results["methods"]["demo-mouse-brain"], results["methods"]["demo-mouse-brain+fresh"]
    assert adapted["label_prediction"] == base["label_prediction"]  # fresh adapters change nothing
    assert adapted["source"].endswith(f"with adapters {fresh_adapters}")
    assert results["methods"]["demo-mouse-brain"]["dimensions"] == 128
    assert results["methods"]["pca"]["dimensions"] == 50
    # classes under 10 cells are left out of label prediction only
    labels = pd.Series(results["labels"])
    assert results["cells"] == 999  # the cell without counts is left out of every method
    assert results["cells_for_label_prediction"] == labels[labels >= 10].sum()


def all_scores(method: dict) -> list[float]:
    folds = [v for scores in method["label_prediction"].values() for values in scores.values() for v in values]
    transfers = [t[s] for t in method["cross_species_label_prediction"] for s in SCORES]
    return (
        folds + transfers + [method["silhouette_label"], method["clustering"]["nmi"], *method["batch_mixing"].values()]
    )


@pytest.mark.slow  # the demo_report fixture: two minutes or more on two cores
def test_metrics_are_in_their_ranges(demo_report):
    _, results, _ = demo_report
    for name, method in results["methods"].items():
        assert all(0 <= value <= 1 for value in all_scores(method)), name
        assert -0.5 <= method["clustering"]["ari"] <= 1
        assert method["clustering"]["clusters"] >= 2
        for scores in method["label_prediction"].values():
            assert all(len(folds) == 5 for folds in scores.values())
        pairs = {(t["train"], t["test"]) for t in method["cross_species_label_prediction"]}
        assert pairs == {("first", "second"), ("second", "first"), ("first", "first"), ("second", "second")}


def mean_f1(method: dict, classifier: str) -> float:
    return float(np.mean(method["label_prediction"][classifier]["f1"]))


@pytest.mark.slow  # the demo_report fixture: two minutes or more on two cores
def test_pca_and_the_demo_model_beat_a_random_embedding(demo_report):
    methods = demo_report[1]["methods"]
    for classifier in ("lr", "knn", "rf", "knn_unscaled"):
        chance = mean_f1(methods["X_random"], classifier)
        assert chance < 0.25, classifier
        assert mean_f1(methods["pca"], classifier) > chance + 0.4, classifier
        assert mean_f1(methods["demo-mouse-brain"], classifier) > chance + 0.2, classifier
    assert methods["pca"]["clustering"]["ari"] > methods["X_random"]["clustering"]["ari"] + 0.2
    transfers = methods["pca"]["cross_species_label_prediction"]
    lr_transfer = [t["f1"] for t in transfers if t["classifier"] == "lr" and t["train"] != t["test"]]
    assert min(lr_transfer) > 0.5


@pytest.mark.slow  # the demo_report fixture: two minutes or more on two cores
def test_the_report_files_are_written(demo_report):
    printed, _, output = demo_report
    assert printed.splitlines()[-1] == f"Output: {output.resolve()}"
    umap, bars = imread(output / UMAP_FIGURE), imread(output / METRICS_FIGURE)
    assert umap.shape[0] > 600 and umap.shape[1] > 1200  # five panels in two rows, and the legend
    assert bars.shape[0] > 300 and bars.shape[1] > 600


@pytest.mark.parametrize(
    "path",
    [pytest.param(MOUSE_BRAIN, id="mouse_brain_1k"), pytest.param(PBMC, id="pbmc3k", marks=pytest.mark.slow)],
)  # pbmc3k: 37 s on two busy cores
def test_the_pca_baseline_predicts_cell_types_far_above_chance(path):
    config = EvaluateConfig(data_file=str(path), label_key="cell_type")
    cells = read_cells(config)
    values = pca_embedding(cells.adata, config).values
    kept = predictable_cells(cells.labels, config.min_class_size, "cell_type")
    labels = cells.labels[kept]
    majority = labels.value_counts(normalize=True).iloc[0]  # accuracy of always guessing the largest class
    scores = label_prediction(values[kept], labels, config)
    for classifier in ("lr", "knn_unscaled"):
        assert np.mean(scores[classifier]["accuracy"]) > majority + 0.3, classifier
        assert np.mean(scores[classifier]["f1"]) > 0.75, classifier
        assert np.mean(scores[classifier]["auroc"]) > 0.95, classifier
    assert 0.5 < label_silhouette(values, cells.labels.to_numpy()) <= 1


def test_batch_metrics_tell_mixed_batches_from_separated_ones():
    config = EvaluateConfig(data_file=str(PBMC), label_key="cell_type", entropy_neighbors=50)
    cells = read_cells(config)
    values = pca_embedding(cells.adata, config).values
    labels = cells.labels.to_numpy()
    mixed = np.random.default_rng(1).choice(["a", "b"], size=len(labels))
    separated = np.where(np.isin(labels, ["CD14+ Mono", "FCGR3A+ Mono", "DC"]), "myeloid", "lymphoid")
    every_cell = np.arange(len(labels))
    assert batch_entropy(values, mixed, every_cell, config) > 0.95
    assert batch_entropy(values, separated, every_cell, config) < 0.1
    assert batch_silhouette(values, labels, mixed) > 0.9
    assert 0 <= batch_silhouette(values, separated, mixed) <= 1


@pytest.mark.slow  # three runs, the first compiling scanpy's neighbour search: about 20 s on two cores
def test_the_same_seed_gives_the_same_results(tmp_path):
    cells = ad.read_h5ad(PBMC)[::6].copy()  # 440 cells
    path = tmp_path / "pbmc.h5ad"
    cells.write_h5ad(path)
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        code, printed, _ = evaluate("--data-file", path, "--label-key", "cell_type", "--seed", seed, "--output-path",
                                 tmp_path / name)  # fmt: skip
        assert code == 0, printed
        runs.append(json.loads((tmp_path / name / RESULTS_FILE).read_text()))
    assert runs[0] == runs[1]
    assert runs[0]["methods"]["pca"] != runs[2]["methods"]["pca"]  # other folds, other forest


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--label-key", "cell_typo"], ["--label-key 'cell_typo' is not an obs column", "cell_type_ontology_term_id"]),
        (["--label-key", "organism"], ["--label-key 'organism' has 1 class(es)", "'Mus musculus': 1000", "two"]),
        (["--label-key", "cell_type", "--batch-key", "donor_id"], ["--batch-key 'donor_id' holds a single value"]),
        (["--label-key", "cell_type", "--obsm-key", "X_scVI"], ["--obsm-key 'X_scVI' is not in the file's obsm"]),
        (["--label-key", "cell_type", "--adapter", "adapters"], ["adapter(s) need the one checkpoint", "got 0"]),
    ],
    ids=["wrong-label-key", "single-class", "single-batch", "missing-obsm-key", "adapter-without-checkpoint"],
)
def test_user_mistakes_are_one_line_errors(capsys, tmp_path, args, words):
    output = tmp_path / "evaluation"
    code, err = run_cli(capsys, "evaluate", "--data-file", MOUSE_BRAIN, *args, "--output-path", output)
    assert_one_line_error(code, err, "evaluate", *words)
    assert not output.exists()


@pytest.fixture(scope="module")
def odd_embeddings(tmp_path_factory) -> Path:
    """200 mouse brain cells with embeddings in obsm that no task can use, and a column of 120 labels."""
    cells = ad.read_h5ad(MOUSE_BRAIN)[:200].copy()
    good = np.random.default_rng(0).normal(size=(cells.n_obs, 8))
    cells.obsm["no_columns"] = np.zeros((cells.n_obs, 0))
    cells.obsm["infinite"] = np.where(np.arange(8) == 0, np.inf, good)
    cells.obsm["beyond_float32"] = np.full((cells.n_obs, 3), 1e300)
    cells.obsm["all_nan"] = np.full((cells.n_obs, 3), np.nan)
    cells.obsm["complex"] = good.astype(np.complex64)
    cells.obsm["good"] = good
    cells.obs["many"] = [f"type{i % 120}" for i in range(cells.n_obs)]
    for column in range(40):
        cells.obs[f"extra_{column}"] = 0
    path = tmp_path_factory.mktemp("odd") / "odd.h5ad"
    cells.write_h5ad(path)
    return path


ENTRY = "give --obsm-key the key of a cell embedding"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--obsm-key", "no_columns"], ["--obsm-key 'no_columns' holds an array of shape (200, 0)", ENTRY]),
        (["--obsm-key", "infinite"], ["--obsm-key 'infinite' holds infinite values", ENTRY]),
        (["--obsm-key", "beyond_float32"], ["--obsm-key 'beyond_float32' holds infinite values", "float32"]),
        (["--obsm-key", "all_nan"], ["--obsm-key 'all_nan' is NaN for every cell", ENTRY]),
        (["--obsm-key", "complex"], ["--obsm-key 'complex' holds complex64 values, not real numbers", ENTRY]),
        (["--obsm-key", "good", "--obsm-key", "good"], ["--obsm-key 'good' is given twice"]),
        (["--checkpoint-path", DEMO, "--checkpoint-path", DEMO], ["--checkpoint-path", "is given twice"]),
        (["--seed", "-1"], ["--seed must be >= 0 and < 4294967296"]),
        (["--seed", str(2**64)], ["--seed must be >= 0 and < 4294967296"]),
        (["--label-key", "many"], ["'many' has 0 class(es) of at least 10 cells", "'type0': 2"]),
        (["--data-file", "no_counts"], ["nothing to evaluate: the file has no genes", "--obsm-key or --"]),
        (["--batch-key", "missing"], ["'missing' is not an obs column", "and 62 more"]),
    ],
    ids=[
        "0-columns",
        "inf",
        "beyond-float32",
        "all-nan",
        "complex",
        "obsm-twice",
        "checkpoint-twice",
        "negative-seed",
        "huge-seed",
        "120-labels",
        "no-counts",
        "many-columns",
    ],  # fmt: skip
)
def test_bad_embeddings_and_settings_are_one_line_errors_before_any_compute(capsys, tmp_path, odd_embeddings, args,
                                                                               words):  # fmt: skip
    output = tmp_path / "evaluation"
    label = [] if "--label-key" in args else ["--label-key", "cell_type"]
    if "no_counts" in args:  # labels alone: no genes, no embedding
        ad.AnnData(obs=ad.read_h5ad(odd_embeddings).obs).write_h5ad(tmp_path / "no_counts.h5ad")
        args = ["--data-file", tmp_path / "no_counts.h5ad"]
    else:
        args = ["--data-file", odd_embeddings, *args]
    code, err = run_cli(capsys, "evaluate", *label, *args, "--output-path", output)
    assert_one_line_error(code, err, "evaluate", *words)
    assert len(err.strip().splitlines()[-1]) < 400  # no line listing every label or column
    assert "embedding the cells" not in err  # refused before any model runs
    assert not output.exists()


def test_the_report_folder_is_its_own(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, "evaluate", "--data-file", MOUSE_BRAIN, "--label-key", "cell_type", "--output-path",
                        folder, "--overwrite")  # fmt: skip
    assert_one_line_error(code, err, "evaluate", "holds files that are not an evaluation report (notes.txt)")
    assert sorted(path.name for path in folder.iterdir()) == ["notes.txt"]
    monkeypatch.chdir(folder)
    code, err = run_cli(
        capsys, "evaluate", "--data-file", MOUSE_BRAIN, "--label-key", "cell_type", "--output-path", "."
    )
    assert_one_line_error(code, err, "evaluate", "holds the working folder", "./evaluate_results")
    report = tmp_path / "report"
    report.mkdir()
    (report / RESULTS_FILE).write_text("{}")
    code, err = run_cli(capsys, "evaluate", "--data-file", MOUSE_BRAIN, "--label-key", "cell_type", "--output-path",
                        report)  # fmt: skip
    assert_one_line_error(code, err, "evaluate", "already holds a report", "pass --overwrite or another folder")
    assert (report / RESULTS_FILE).read_text() == "{}"


@pytest.mark.slow  # the demo_report fixture: two minutes or more on two cores
def test_a_report_is_not_overwritten_unless_asked(capsys, demo_report, mouse_cells):
    output = demo_report[2]
    before = (output / RESULTS_FILE).read_text()
    code, err = run_cli(capsys, "evaluate", "--data-file", mouse_cells, "--label-key", "cell_type", "--output-path",
                        output)  # fmt: skip
    assert_one_line_error(code, err, "evaluate", "already holds a report", "--overwrite")
    assert (output / RESULTS_FILE).read_text() == before


@pytest.fixture(scope="module")
def timed_cells(tmp_path_factory) -> Path:
    """440 PBMCs with a numeric time column (tied to the cell types) and two halves standing in for species."""
    cells = ad.read_h5ad(PBMC)[::6].copy()
    rng = np.random.default_rng(0)
    cells.obs["day"] = (pd.Categorical(cells.obs["cell_type"]).codes % 3).astype(float) * 2
    cells.obs["day_text"] = cells.obs["day"].map(lambda day: f"day {day:g}")
    cells.obs["half"] = np.where(rng.random(cells.n_obs) < 0.5, "first", "second")
    cells.obs["one_species"] = "human"
    path = tmp_path_factory.mktemp("timed") / "pbmc.h5ad"
    cells.write_h5ad(path)
    return path


def test_sequential_organisation_species_mixing_and_saved_embeddings(timed_cells, tmp_path):
    output = tmp_path / "evaluation"
    code, printed, warned = evaluate("--data-file", timed_cells, "--label-key", "cell_type", "--time-key", "day",
                                     "--species-key", "half", "--save-embeddings", "--output-path", output)  # fmt: skip
    assert code == 0, printed + warned
    assert "embeddings.h5ad" in printed
    pca = json.loads((output / RESULTS_FILE).read_text())["methods"]["pca"]
    assert pca["baseline"].startswith("PCA of the counts: cz-benchmarks' baseline of clustering")
    assert set(pca["label_prediction"]["lr"]) == set(SCORES) == {"accuracy", "f1", "precision", "recall", "auroc"}
    # the times follow the cell types, which PCA separates; the halves are random, so mixed
    assert 0.3 < pca["sequential_organisation"]["sequential_alignment"] <= 1
    assert 0.5 < pca["sequential_organisation"]["silhouette_time"] <= 1
    assert pca["cross_species_integration"]["entropy"] > 0.9
    transfers = pca["cross_species_label_prediction"]
    transferred = {(t["train"], t["test"]) for t in transfers if "split" not in t}
    assert transferred == {("first", "second"), ("second", "first")}
    assert len([t for t in transfers if "split" in t]) == 2 * 3 * 5  # two species, three classifiers, five folds
    assert min(t["f1"] for t in transfers if t["classifier"] == "lr" and "split" not in t) > 0.5
    saved = ad.read_h5ad(output / "embeddings.h5ad")
    assert list(saved.obsm) == ["pca"] and saved.n_vars == 0
    assert list(saved.obs_names) == list(ad.read_h5ad(timed_cells).obs_names)
    config = EvaluateConfig(data_file=str(timed_cells), label_key="cell_type")
    np.testing.assert_array_equal(saved.obsm["pca"], pca_embedding(read_cells(config).adata, config).values)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--time-key", "day_text"], ["--time-key 'day_text' is not numeric ('day ", "column of numbers"]),
        (["--species-key", "one_species"], ["--species-key 'one_species' holds a single value ('human')"]),
        (["--time-key", "cell_type"], ["--time-key is the label column 'cell_type'"]),
        (["--sample-key", "half"], ["--sample-key is used by cross-species label prediction", "--species-key"]),
    ],
    ids=["time-not-numeric", "one-species", "time-is-label", "samples-without-species"],
)
def test_bad_input_of_the_new_tasks_is_a_one_line_error(capsys, tmp_path, timed_cells, args, words):
    output = tmp_path / "evaluation"
    code, err = run_cli(capsys, "evaluate", "--data-file", timed_cells, "--label-key", "cell_type", *args,
                        "--output-path", output)  # fmt: skip
    assert_one_line_error(code, err, "evaluate", *words)
    assert not output.exists()


HELD_OUT = DATA_DIR / "demo_mouse_brain_heldout.h5ad"


def run_command(*args) -> tuple[int, str, str]:
    """Run ``transcriptformer ARGS`` in-process (quiet); its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*map(str, args), "--quiet"])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow  # a model run and an evaluation each: 20 s or more on two cores
@pytest.mark.parametrize(
    ("command", "output_keys", "written", "reason"),
    [
        ("inference", [], "embeddings.h5ad", "the file has no genes (no X, no raw.X)"),
        ("score", ["embeddings", "mu", "mean_log_likelihood"], "scores.h5ad", "X holds the model's 'mu'"),
    ],
    ids=["inference", "score-with-mu"],
)  # fmt: skip
def test_evaluate_takes_the_outputs_of_inference_and_score(tmp_path, command, output_keys, written, reason):
    keys = ["--output-keys", *output_keys] if output_keys else []
    code, _, err = run_command(command, "--checkpoint-path", DEMO, "--data-file", HELD_OUT, "--output-path",
                               tmp_path / command, *keys)  # fmt: skip
    assert code == 0, err
    output = tmp_path / command / written
    cells = ad.read_h5ad(output)
    key = next(key for key in ("X_transcriptformer", "embeddings") if key in cells.obsm)
    code, printed, warned = evaluate("--data-file", output, "--label-key", "cell_type", "--output-path", tmp_path / "e")
    assert code == 0, warned
    assert f"transcriptformer evaluate: warning: pca baseline skipped: {reason}" in warned
    results = json.loads((tmp_path / "e" / RESULTS_FILE).read_text())
    assert list(results["methods"]) == [key]  # the embedding, no baseline computed on mu or on nothing
    assert results["skipped_baselines"]["pca"].startswith(reason)
    assert printed.splitlines()[0].split() == [key]
    assert results["methods"][key]["dimensions"] == cells.obsm[key].shape[1] == 128
    assert results["cells"] == cells.n_obs == 100
    code, _, err = run_command("evaluate", "--data-file", output, "--label-key", "cell_type", "--checkpoint-path",
                               DEMO, "--output-path", tmp_path / "ev2")  # fmt: skip
    assert_one_line_error(code, err, "evaluate", "--checkpoint-path needs the cells' counts", reason, "--data-file")
    assert not (tmp_path / "ev2").exists()


KNOCKED_OUT = ("Nfix", "Pou3f3", "Ntrk3")  # the three genes most often detected in the mouse brain cells


def knock_out_screen(path: Path, controls: int = 400, per_gene: int = 100, genes: tuple = KNOCKED_OUT) -> Path:
    """Real mouse brain cells laid out as a knock-out screen whose effects are simulated, written to ``path``.

    No Perturb-seq data is bundled: ``controls`` cells are controls (``ctrl``) and groups of ``per_gene`` are
    "knocked out" of one of ``genes`` each: that gene's counts set to 0, 30 other genes thinned (each count kept with
    probability 0.2, binomially) and 20 raised (Poisson of three times the count plus one), so that differential
    expression finds real, known effects in real counts. The other cells are left out.
    """
    cells = ad.read_h5ad(MOUSE_BRAIN)
    counts = cells.X.toarray()
    rng = np.random.default_rng(0)
    order = rng.permutation(cells.n_obs)
    condition = np.full(cells.n_obs, "", dtype=object)
    condition[order[:controls]] = "ctrl"
    symbols = pd.Index(cells.var["gene_name"].astype(str))
    common = np.flatnonzero((counts > 0).mean(axis=0) >= 0.1)
    for i, gene in enumerate(genes):
        rows = order[controls + per_gene * i : controls + per_gene * (i + 1)]
        condition[rows] = gene
        counts[rows, symbols.get_loc(gene)] = 0
        others = rng.choice(np.setdiff1d(common, symbols.get_indexer(KNOCKED_OUT)), 50, replace=False)
        down, up = np.ix_(rows, others[:30]), np.ix_(rows, others[30:])
        counts[down] = rng.binomial(counts[down].astype(np.int64), 0.2)
        counts[up] = rng.poisson(3 * counts[up] + 1)
    cells.X = sp.csr_matrix(counts)
    cells.obs["perturbation"] = condition
    screen = cells[condition != ""].copy()
    screen.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def screen_cells(tmp_path_factory) -> Path:
    return knock_out_screen(tmp_path_factory.mktemp("screen") / "screen.h5ad")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--perturbation-key", "missing"], ["--perturbation-key 'missing' is not an obs column"]),
        (["--perturbation-key", "perturbation", "--control-value", "none"],
         ["--perturbation-key 'perturbation' has no control cells (--control-value 'none'", "'Ntrk3'"]),
        (["--perturbation-key", "cell_type"], ["--perturbation-key is the label column 'cell_type'"]),
    ],
    ids=["missing-column", "no-control-cells", "label-column"],
)  # fmt: skip
def test_bad_perturbation_input_is_a_one_line_error_before_any_model_runs(capsys, tmp_path, screen_cells, args, words):
    output = tmp_path / "evaluation"
    code, err = run_cli(capsys, "evaluate", "--data-file", screen_cells, "--label-key", "cell_type",
                        "--checkpoint-path", DEMO, *args, "--output-path", output)  # fmt: skip
    assert_one_line_error(code, err, "evaluate", *words)
    assert "embedding the cells" not in err
    assert not output.exists()


def test_perturbation_needs_a_checkpoint(capsys, tmp_path, screen_cells):
    code, err = run_cli(capsys, "evaluate", "--data-file", screen_cells, "--label-key", "cell_type",
                        "--perturbation-key", "perturbation", "--output-path", tmp_path / "e")  # fmt: skip
    assert_one_line_error(code, err, "evaluate", "--perturbation-key judges a model's perturb predictions",
                          "give --checkpoint-path")  # fmt: skip


@pytest.mark.slow  # the demo model embeds 200 cells and perturbs 100, every task on three methods: minutes
def test_perturbation_expression_prediction_of_the_demo_model(tmp_path):
    screen = knock_out_screen(tmp_path / "screen.h5ad", controls=100, per_gene=50, genes=KNOCKED_OUT[:2])
    output = tmp_path / "evaluation"
    code, printed, warned = evaluate("--data-file", screen, "--label-key", "cell_type", "--perturbation-key",
                                     "perturbation", "--checkpoint-path", DEMO, "--output-path", output)  # fmt: skip
    assert code == 0, warned
    results = json.loads((output / RESULTS_FILE).read_text())
    judged = results["methods"]["demo-mouse-brain"]["perturbation_expression_prediction"]
    assert sorted(judged["conditions"]) == sorted(KNOCKED_OUT[:2])
    for condition in judged["conditions"].values():
        assert -1 <= condition["spearman"] <= 1
        assert condition["cells"] == 50 and condition["genes"] >= 1
        assert condition["operation"] in ("ratio", "difference")
    assert judged["mean_spearman"] == pytest.approx(np.mean([c["spearman"] for c in judged["conditions"].values()]))
    assert judged["baseline"].startswith("none: cz-benchmarks 0.15.1 defines no baseline")
    assert all(
        "perturbation_expression_prediction" not in m for n, m in results["methods"].items() if n != "demo-mouse-brain"
    )
    row = next(line for line in printed.splitlines() if line.startswith("perturbation spearman"))
    assert row.split()[2:] == [f"{judged['mean_spearman']:.3f}", "-", "-"]
    assert results["settings"]["perturbation_key"] == "perturbation"
