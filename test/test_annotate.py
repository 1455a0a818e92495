"""Label transfer from a labelled reference (transcriptformer.annotation) on the real mouse brain cells.

Embeddings: PCA (50 components, fitted on the reference) of the log-normalised counts of test/data/mouse_brain_1k.h5ad,
split into a reference (70 %) and a query (30 %) at random.
"""

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from sklearn.decomposition import PCA
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

import transcriptformer
from transcriptformer.annotation import UNKNOWN, AnnotateConfig, ReferenceIndex, summarize
from transcriptformer.errors import UserError
from transcriptformer.safe_load import load_npz

DATA = Path(__file__).parent / "data" / "mouse_brain_1k.h5ad"
KEY = "cell_type"


@pytest.fixture(scope="module")
def split() -> dict:
    cells = ad.read_h5ad(DATA)
    sc.pp.normalize_total(cells, target_sum=1e4)
    sc.pp.log1p(cells)
    counts = cells.X.toarray()
    in_reference = np.random.default_rng(0).random(cells.n_obs) < 0.7
    pca = PCA(50, random_state=0).fit(counts[in_reference])
    return {
        "reference": pca.transform(counts[in_reference]).astype(np.float32),
        "query": pca.transform(counts[~in_reference]).astype(np.float32),
        "reference_obs": cells.obs[in_reference].reset_index(drop=True),
        "query_labels": cells.obs[KEY][~in_reference].astype(str).to_numpy(),
    }


def build(split: dict, **settings) -> ReferenceIndex:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's one-cell classes; tested below
        return ReferenceIndex.build(
            split["reference"], split["reference_obs"], KEY, settings=AnnotateConfig(**settings)
        )


def predicted(frame: pd.DataFrame, key: str = KEY) -> np.ndarray:
    return frame[f"predicted_{key}"].astype(str).to_numpy()


def scikit_learn_knn(metric: str, n_neighbors: int) -> KNeighborsClassifier:
    """The plain kNN with the vote weights of the annotation: cosine similarity clipped at 0, or 1 / distance."""
    weights = (lambda distances: np.clip(1.0 - distances, 0.0, None)) if metric == "cosine" else "distance"
    return KNeighborsClassifier(n_neighbors=n_neighbors, metric=metric, weights=weights, algorithm="brute")


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_without_rejection_equals_scikit_learn_knn(split, metric):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = transcriptformer.annotate(
            split["query"], split["reference"], split["reference_obs"], KEY, metric=metric, reject=False
        )
    knn = scikit_learn_knn(metric, AnnotateConfig.n_neighbors).fit(
        split["reference"], split["reference_obs"][KEY].astype(str)
    )
    expected = knn.predict(split["query"])
    truth = split["query_labels"]
    ours = predicted(frame)
    assert UNKNOWN not in ours
    assert abs(f1_score(truth, ours, average="macro") - f1_score(truth, expected, average="macro")) <= 0.02
    assert (ours == expected).mean() >= 0.99
    assert f1_score(truth, ours, average="macro") > 0.4  # 21 types, several of one to five cells
    assert (ours == truth).mean() > 0.85
    confidence = frame[f"{KEY}_confidence"].to_numpy()
    assert confidence.dtype == np.float32 and ((confidence > 0) & (confidence <= 1)).all()


def test_threshold_is_the_quantile_of_correct_held_out_confidences(split):
    """Held out one by one (as many folds as cells), the threshold follows from a plain neighbour search."""
    n_cells = len(split["reference"])
    index = build(split, calibration_cells=n_cells, calibration_folds=n_cells, false_unknown_rate=0.1)
    k = AnnotateConfig.n_neighbors
    distances, neighbors = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(split["reference"]).kneighbors()
    labels = split["reference_obs"][KEY].astype(str).to_numpy()
    classes = np.unique(labels)
    votes = np.zeros((n_cells, len(classes)))
    for cell in range(n_cells):  # kneighbors() without X leaves each cell itself out
        np.add.at(votes[cell], np.searchsorted(classes, labels[neighbors[cell, :k]]), 1 - distances[cell, :k])
    confidence = votes.max(axis=1) / votes.sum(axis=1)
    correct = classes[votes.argmax(axis=1)] == labels
    expected = np.quantile(confidence[correct], 0.1, method="lower")
    calibration = index.calibration[KEY]
    assert calibration.threshold == pytest.approx(expected, abs=1e-5)
    assert calibration.accuracy == pytest.approx(correct.mean())
    assert calibration.cells == n_cells


def test_unknown_exactly_below_the_threshold(split):
    index = build(split)
    threshold = index.calibration[KEY].threshold
    assert 0.5 < threshold <= 1
    frame = index.annotate(split["query"])
    unknown = predicted(frame) == UNKNOWN
    assert unknown.any()
    np.testing.assert_array_equal(unknown, frame[f"{KEY}_confidence"].to_numpy() < threshold)
    plain = index.annotate(split["query"], reject=False)
    np.testing.assert_array_equal(predicted(frame)[~unknown], predicted(plain)[~unknown])
    no_rejection = build(split, false_unknown_rate=0.0).annotate(split["query"])
    assert UNKNOWN not in predicted(no_rejection)


def test_a_type_missing_from_the_reference_is_mostly_unknown(split):
    held_out = "oligodendrocyte"
    keep = (split["reference_obs"][KEY] != held_out).to_numpy()
    reduced = {**split, "reference": split["reference"][keep], "reference_obs": split["reference_obs"][keep]}
    frame = build(reduced).annotate(split["query"])
    novel = split["query_labels"] == held_out
    unknown = predicted(frame) == UNKNOWN
    assert novel.sum() > 20
    assert unknown[novel].mean() > 0.5
    assert unknown[novel].mean() > 3 * unknown[~novel].mean()


def test_several_label_keys(split):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = ReferenceIndex.build(split["reference"], split["reference_obs"], [KEY, "major_brain_region"])
    frame = index.annotate(split["query"])
    assert list(frame.columns) == [
        f"predicted_{KEY}",
        f"{KEY}_confidence",
        "predicted_major_brain_region",
        "major_brain_region_confidence",
    ]
    regions = set(split["reference_obs"]["major_brain_region"].astype(str)) | {UNKNOWN}
    assert set(predicted(frame, "major_brain_region")) <= regions
    alone = build(split).annotate(split["query"])
    pd.testing.assert_frame_equal(frame[alone.columns], alone)


def test_approximate_index_agrees_with_exact_search(split):
    exact = build(split)
    approximate = build(split, exact_max_cells=100, n_lists=8, n_probe=8)
    assert exact.exact and not approximate.exact
    agreement = predicted(exact.annotate(split["query"], reject=False)) == predicted(
        approximate.annotate(split["query"], reject=False)
    )
    assert agreement.mean() >= 0.97


@pytest.mark.parametrize("approximate", [False, True])
def test_saved_index_loads_back(split, tmp_path, approximate):
    settings = {"exact_max_cells": 100, "n_lists": 8} if approximate else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = ReferenceIndex.build(
            split["reference"], split["reference_obs"], [KEY, "major_brain_region"], model_id="sha256:abc",
            settings=AnnotateConfig(metric="euclidean", **settings),
        )  # fmt: skip
    folder = index.save(tmp_path / "index")
    assert sorted(p.name for p in folder.iterdir()) == ["index.faiss", "labels.npz", "manifest.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model_id"] == "sha256:abc"
    assert (manifest["metric"], manifest["dimension"], manifest["n_cells"]) == (
        "euclidean",
        50,
        len(split["reference"]),
    )
    assert manifest["label_keys"] == [KEY, "major_brain_region"]
    assert manifest["exact"] is not approximate
    assert manifest["calibration"][KEY]["threshold"] == index.calibration[KEY].threshold
    arrays = load_npz(folder / "labels.npz", what="labels", fix="")  # allow_pickle=False
    assert list(arrays["classes_0"][arrays["codes_0"][:3]]) == list(split["reference_obs"][KEY].astype(str)[:3])

    loaded = ReferenceIndex.load(folder)
    assert loaded.model_id == "sha256:abc" and loaded.settings == index.settings
    pd.testing.assert_frame_equal(loaded.annotate(split["query"]), index.annotate(split["query"]))


def test_saved_index_refuses_another_model_and_dimension(split, tmp_path):
    folder = build(split).save(tmp_path / "index")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = ReferenceIndex.build(split["reference"], split["reference_obs"], KEY, model_id="sha256:abc")
    index.save(tmp_path / "identified")
    loaded = ReferenceIndex.load(tmp_path / "identified")
    with pytest.raises(UserError, match="embedded by model sha256:other, the reference index by model sha256:abc"):
        loaded.annotate(split["query"], model_id="sha256:other")
    assert len(loaded.annotate(split["query"], model_id="sha256:abc")) == len(split["query"])
    with pytest.raises(UserError, match="query embeddings have 20 dimensions, the reference index 50"):
        ReferenceIndex.load(folder).annotate(split["query"][:, :20])


def test_saved_index_checks_its_files(split, tmp_path):
    folder = build(split).save(tmp_path / "index")
    with pytest.raises(UserError, match="exists and is not empty"):
        build(split).save(folder)
    with pytest.raises(UserError, match="not an annotation index"):
        ReferenceIndex.load(tmp_path)
    labels = folder / "labels.npz"
    labels.write_bytes(labels.read_bytes()[:-10])
    with pytest.raises(UserError, match="labels.npz is missing or changed"):
        ReferenceIndex.load(folder)


def test_one_cell_class_is_named_in_a_warning(split):
    with pytest.warns(UserWarning, match=r"'cholinergic neuron' \(1 cell\)") as caught:
        ReferenceIndex.build(split["reference"], split["reference_obs"], KEY)
    assert len(str(caught[0].message).splitlines()) == 1


def test_label_key_missing_or_all_nan(split):
    with pytest.raises(UserError, match="label key 'celltype' not in the reference labels; choose among: .*cell_type"):
        ReferenceIndex.build(split["reference"], split["reference_obs"], "celltype")
    obs = split["reference_obs"].assign(empty=np.nan)
    with pytest.raises(UserError, match="label key 'empty': every reference cell's label is missing"):
        ReferenceIndex.build(split["reference"], obs, "empty")
    partial = split["reference_obs"][KEY].astype(object).copy()
    partial[:10] = np.nan
    with pytest.warns(UserWarning, match=f"10 of {len(partial)} reference cells have no label and do not vote"):
        index = ReferenceIndex.build(split["reference"], partial, settings=AnnotateConfig(false_unknown_rate=0))
    assert index.label_keys == [KEY]
    assert UNKNOWN not in predicted(index.annotate(split["query"]))


def test_bad_labels_and_embeddings(split):
    with pytest.raises(UserError, match="labelled 'Unknown'"):
        ReferenceIndex.build(split["reference"][:4], ["a", "b", UNKNOWN, "a"])
    with pytest.raises(UserError, match="has 3 values for 4 reference cells"):
        ReferenceIndex.build(split["reference"][:4], ["a", "b", "a"])
    with pytest.raises(UserError, match="the reference has no cells"):
        transcriptformer.annotate(split["query"], np.empty((0, 50)), [])
    with pytest.raises(UserError, match="reference embeddings have shape"):
        ReferenceIndex.build(np.zeros(5), ["a"] * 5)
    with pytest.raises(UserError, match="metric must be one of cosine, euclidean"):
        AnnotateConfig(metric="manhattan")


def test_nan_embeddings_are_left_out_with_a_warning(split):
    reference = split["reference"].copy()
    reference[[3, 7]] = np.nan
    reference[9] = 0.0  # no direction under cosine
    with pytest.warns(UserWarning, match=r"3 of \d+ reference cells have NaN or infinite embeddings or all zero "):
        index = ReferenceIndex.build(reference, split["reference_obs"], KEY)
    assert index.n_cells == len(reference) - 3
    assert 3 not in index.rows and 10 in index.rows

    query = split["query"].copy()
    query[[0, 5]] = np.nan
    with pytest.warns(UserWarning, match=r"2 of \d+ query cells have NaN .* \(rows 0, 5\); they get no label"):
        frame = index.annotate(query)
    assert frame[f"predicted_{KEY}"].isna().sum() == 2 and frame[f"predicted_{KEY}"][[0, 5]].isna().all()
    assert np.isnan(frame[f"{KEY}_confidence"][[0, 5]]).all()
    assert frame[f"predicted_{KEY}"].notna().sum() == len(query) - 2


def test_api_defaults_are_the_settings_defaults():
    import inspect

    parameters = inspect.signature(transcriptformer.annotate).parameters
    for name in ("n_neighbors", "metric", "reject", "false_unknown_rate", "seed"):
        assert parameters[name].default == getattr(AnnotateConfig(), name), name


def test_summary_counts_the_predicted_labels(split):
    query = split["query"].copy()
    query[0] = np.nan
    with pytest.warns(UserWarning, match="1 of"):
        frame = build(split).annotate(query)
    summary = summarize(frame)[KEY]
    labels = predicted(frame)
    assert summary["cells"] == len(query) and summary["labelled"] == len(query) - 1
    assert summary["unknown"] == (labels == UNKNOWN).sum() > 0
    assert summary["unknown_rate"] == pytest.approx(summary["unknown"] / (len(query) - 1))
    assert sum(summary["counts"].values()) == len(query) - 1
    top = max(summary["counts"], key=summary["counts"].get)
    assert list(summary["counts"])[0] == top and summary["counts"][top] == (labels == top).sum()
    assert summary["mean_confidence"] == pytest.approx(np.nanmean(frame[f"{KEY}_confidence"]))
    json.dumps(summary)


@pytest.mark.parametrize("approximate", [False, True])
def test_reference_read_in_chunks_from_hdf5(split, tmp_path, approximate):
    """A reference in a file (as a backed .h5ad's obsm) is read a chunk at a time: the index is the same."""
    import h5py

    settings = {"chunk_cells": 100, **({"exact_max_cells": 100, "n_lists": 8} if approximate else {})}
    with h5py.File(tmp_path / "reference.h5", "w") as f:
        f["X"] = split["reference"]
    with h5py.File(tmp_path / "reference.h5") as f:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from_file = ReferenceIndex.build(f["X"], split["reference_obs"], KEY, settings=AnnotateConfig(**settings))
    in_memory = build(split, **settings)
    assert from_file.exact is not approximate
    assert from_file.calibration == in_memory.calibration
    pd.testing.assert_frame_equal(from_file.annotate(split["query"]), in_memory.annotate(split["query"]))
