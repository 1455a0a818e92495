"""``transcriptformer annotate`` run in-process on the bundled mouse brain cells, split into a reference and a query.

From precomputed embeddings (a PCA written here, or ``inference`` outputs) and from the bundled checkpoint; a saved
index, a SOMA experiment's embeddings array, a reference of another species' gene table; the mistakes a user makes.
"""

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from sklearn.decomposition import PCA
from sklearn.metrics import f1_score

import transcriptformer
from conftest import DATA_DIR, REFERENCE_DIR, assert_no_output
from test_annotate import scikit_learn_knn
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.annotation import UNKNOWN, AnnotateConfig, ReferenceIndex
from transcriptformer.cli import main
from transcriptformer.data.vocab import write_embedding_table
from transcriptformer.tasks.annotate import CONFUSION_FILE, SUMMARY_FILE, UMAP_FILE

KEY = "cell_type"
DEMO_DIR = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """mouse_brain_1k.h5ad split 70/30 into reference.h5ad and query.h5ad, a PCA of the reference in obsm."""
    folder = tmp_path_factory.mktemp("annotate")
    cells = ad.read_h5ad(DATA_DIR / "mouse_brain_1k.h5ad")
    normalized = cells.copy()
    sc.pp.normalize_total(normalized, target_sum=1e4)
    sc.pp.log1p(normalized)
    in_reference = np.random.default_rng(0).random(cells.n_obs) < 0.7
    pca = PCA(30, random_state=0).fit(normalized.X[in_reference].toarray())
    cells.obsm["X_pca"] = pca.transform(normalized.X.toarray()).astype(np.float32)
    paths = {"reference": folder / "reference.h5ad", "query": folder / "query.h5ad", "folder": folder}
    cells[in_reference].copy().write_h5ad(paths["reference"])
    cells[~in_reference].copy().write_h5ad(paths["query"])
    return paths


@pytest.fixture(scope="module")
def embedded(files) -> dict:
    """Both files through ``transcriptformer inference`` with the bundled checkpoint (every obs column kept)."""
    out = {}
    for name in ("reference", "query"):
        output = files["folder"] / f"inference_{name}"
        arguments = ["inference", "--checkpoint-path", REFERENCE_DIR, "--data-file", files[name]]
        assert main([str(a) for a in (*arguments, "--output-path", output, "-q")]) == 0
        out[name] = output / "embeddings.h5ad"
    return out


def annotate(*arguments) -> list[str]:
    return ["annotate", *map(str, arguments), "-q"]


def quietly_main(argv: list[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's one-cell classes, tested below
        return main(argv)


def test_obsm_key_without_rejection_equals_scikit_learn_knn(files, tmp_path, capsys):
    """The issue's check: macro F1 of the command equals a plain kNN's on the same split and neighbours."""
    output = tmp_path / "out"
    arguments = annotate(
        "--reference", files["reference"], "--label-key", KEY, "--data-file", files["query"], "--obsm-key", "X_pca",
        "--no-reject", "--true-key", KEY, "--no-figures", "--output-path", output,
    )  # fmt: skip
    assert quietly_main(arguments) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == f"Output: {(output / 'annotated.h5ad').resolve()}"
    result = ad.read_h5ad(output / "annotated.h5ad")
    reference, query = ad.read_h5ad(files["reference"]), ad.read_h5ad(files["query"])
    knn = scikit_learn_knn("cosine", AnnotateConfig.n_neighbors).fit(reference.obsm["X_pca"], reference.obs[KEY])
    expected = knn.predict(query.obsm["X_pca"])
    truth = query.obs[KEY].astype(str).to_numpy()
    ours = result.obs[f"predicted_{KEY}"].astype(str).to_numpy()
    assert UNKNOWN not in ours
    classes = np.unique(truth)  # the macro F1 of evaluate: over the true labels
    ours_f1 = f1_score(truth, ours, labels=classes, average="macro", zero_division=0)
    knn_f1 = f1_score(truth, expected, labels=classes, average="macro", zero_division=0)
    assert abs(ours_f1 - knn_f1) <= 0.02
    assert (ours == expected).mean() >= 0.99
    assert result.uns["annotation"]["evaluation"]["macro_f1"] == pytest.approx(ours_f1)
    assert f"macro F1 {ours_f1:.4f}" in printed
    assert result.obs_names.equals(query.obs_names) and np.array_equal(result.obsm["X_pca"], query.obsm["X_pca"])
    summary = pd.read_csv(output / SUMMARY_FILE)
    assert summary["cells"].sum() == query.n_obs
    assert dict(zip(summary["predicted"], summary["cells"], strict=True)) == pd.Series(ours).value_counts().to_dict()


@pytest.mark.slow
def test_figures_unknown_rate_and_summary(files, tmp_path):
    output = tmp_path / "out"
    arguments = annotate(
        "--reference", files["reference"], "--label-key", KEY, "--data-file", files["query"], "--obsm-key", "X_pca",
        "--true-key", KEY, "--output-path", output,
    )  # fmt: skip
    assert quietly_main(arguments) == 0
    result = ad.read_h5ad(output / "annotated.h5ad")
    predicted = result.obs[f"predicted_{KEY}"]
    summary = result.uns["annotation"]["summary"][KEY]
    assert summary["unknown"] == (predicted == UNKNOWN).sum() > 0
    assert summary["unknown_rate"] == pytest.approx((predicted == UNKNOWN).mean())
    confidence = result.obs[f"{KEY}_confidence"]
    threshold = result.uns["annotation"]["reference"]["thresholds"][KEY]
    assert (confidence[predicted == UNKNOWN] < threshold).all()
    assert (confidence[predicted != UNKNOWN] >= threshold).all()
    for name in (UMAP_FILE, CONFUSION_FILE):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in output.iterdir()) == sorted(
        [".annotated.h5ad.lock", "annotated.h5ad", SUMMARY_FILE, UMAP_FILE, CONFUSION_FILE]
    )


def test_inference_outputs_chained_into_annotate(files, embedded, tmp_path):
    """``inference`` outputs as both sides (``--obsm-key X_transcriptformer``): the library's labels on them."""
    output = tmp_path / "out"
    arguments = annotate(
        "--reference", embedded["reference"], "--label-key", KEY, "--data-file", embedded["query"],
        "--obsm-key", "X_transcriptformer", "--no-figures", "--output-path", output,
    )  # fmt: skip
    assert quietly_main(arguments) == 0
    reference, query = ad.read_h5ad(embedded["reference"]), ad.read_h5ad(embedded["query"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = transcriptformer.annotate(
            query.obsm["X_transcriptformer"], reference.obsm["X_transcriptformer"], reference.obs, KEY
        )
    result = ad.read_h5ad(output / "annotated.h5ad")
    np.testing.assert_array_equal(result.obs[f"predicted_{KEY}"].astype(str), expected[f"predicted_{KEY}"].astype(str))
    np.testing.assert_allclose(result.obs[f"{KEY}_confidence"], expected[f"{KEY}_confidence"], rtol=1e-6)


@pytest.fixture(scope="module")
def from_checkpoint(files, tmp_path_factory) -> dict:
    """The command from the bundled checkpoint, the reference index saved."""
    folder = tmp_path_factory.mktemp("checkpoint")
    arguments = annotate(
        "--checkpoint-path", REFERENCE_DIR, "--reference", files["reference"], "--label-key", KEY,
        "--data-file", files["query"], "--save-index", folder / "index", "--no-figures", "--output-path",
        folder / "out",
    )  # fmt: skip
    assert quietly_main(arguments) == 0
    return {"output": ad.read_h5ad(folder / "out" / "annotated.h5ad"), "index": folder / "index"}


def test_from_a_checkpoint_equals_inference_then_the_library(embedded, from_checkpoint):
    """The engine's embeddings of both sides, then the library's label transfer on them."""
    result = from_checkpoint["output"]
    reference, query = ad.read_h5ad(embedded["reference"]), ad.read_h5ad(embedded["query"])
    np.testing.assert_array_equal(result.obsm["X_transcriptformer"], query.obsm["X_transcriptformer"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = transcriptformer.annotate(
            query.obsm["X_transcriptformer"], reference.obsm["X_transcriptformer"], reference.obs, KEY
        )
    np.testing.assert_array_equal(result.obs[f"predicted_{KEY}"].astype(str), expected[f"predicted_{KEY}"].astype(str))
    assert result.uns["annotation"]["reference"]["model_id"] == result.uns["transcriptformer"]["weights_sha256"]
    manifest = json.loads((from_checkpoint["index"] / "manifest.json").read_text())
    assert manifest["model_id"] == result.uns["transcriptformer"]["weights_sha256"]


def test_a_saved_index_gives_the_same_labels_and_refuses_another_model(files, from_checkpoint, tmp_path, capsys):
    output = tmp_path / "out"
    arguments = annotate(
        "--checkpoint-path", REFERENCE_DIR, "--index", from_checkpoint["index"], "--data-file", files["query"],
        "--no-figures", "--output-path", output,
    )  # fmt: skip
    assert main(arguments) == 0
    again = ad.read_h5ad(output / "annotated.h5ad")
    first = from_checkpoint["output"]
    assert again.obs[f"predicted_{KEY}"].astype(str).equals(first.obs[f"predicted_{KEY}"].astype(str))
    capsys.readouterr()
    other = tmp_path / "other"
    arguments = annotate(
        "--checkpoint-path", DEMO_DIR, "--index", from_checkpoint["index"], "--data-file", files["query"],
        "--output-path", other,
    )  # fmt: skip
    code, err = run_cli(capsys, *arguments)
    assert_one_line_error(code, err, "annotate", "embedded by model", "reference index by model")
    assert_no_output(other)


def test_a_reference_of_another_species_uses_its_own_gene_table(files, from_checkpoint, tmp_path):
    """The query's genes renamed as another species', with a table of the same vectors: the same labels.

    The reference goes through the checkpoint's own table, the query through its own (--pretrained-embedding):
    identical labels and embeddings show each side read its genes from its own table.
    """
    query = ad.read_h5ad(files["query"])
    checkpoint = transcriptformer.load(REFERENCE_DIR, device="cpu")
    vocab = checkpoint.checkpoint.gene_vocab
    table = checkpoint.model.gene_embeddings.embedding.weight.detach().numpy()
    ids = [g for g in query.var["ensembl_id"] if g in set(vocab.gene_ids)]
    renamed = {g: g.replace("ENSMUSG", "ENSXETG") for g in ids}  # as Xenopus ids: genes the model never saw
    write_embedding_table(tmp_path / "frog.h5", {renamed[g]: table[vocab.lookup([g])[0]] for g in ids})
    frog = query[:, query.var["ensembl_id"].isin(ids)].copy()
    frog.var["ensembl_id"] = frog.var["ensembl_id"].map(renamed)
    frog.write_h5ad(tmp_path / "frog.h5ad")
    output = tmp_path / "out"
    arguments = annotate(
        "--checkpoint-path", REFERENCE_DIR, "--reference", files["reference"], "--label-key", KEY,
        "--data-file", tmp_path / "frog.h5ad", "--pretrained-embedding", tmp_path / "frog.h5", "--no-figures",
        "--output-path", output,
    )  # fmt: skip
    assert quietly_main(arguments) == 0
    result, mouse = ad.read_h5ad(output / "annotated.h5ad"), from_checkpoint["output"]
    np.testing.assert_allclose(
        result.obsm["X_transcriptformer"], mouse.obsm["X_transcriptformer"], rtol=1e-5, atol=1e-6
    )
    agree = (result.obs[f"predicted_{KEY}"].astype(str) == mouse.obs[f"predicted_{KEY}"].astype(str)).mean()
    assert agree == 1.0
    assert list(result.uns["transcriptformer"]["pretrained_embedding"]) == [str(tmp_path / "frog.h5")]


def test_the_python_api_runs_the_same_task(files, from_checkpoint):
    model = transcriptformer.load(REFERENCE_DIR, device="cpu")
    query = ad.read_h5ad(files["query"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = model.annotate(query, ad.read_h5ad(files["reference"]), KEY)
    first = from_checkpoint["output"]
    np.testing.assert_array_equal(frame[f"predicted_{KEY}"].astype(str), first.obs[f"predicted_{KEY}"].astype(str))
    np.testing.assert_array_equal(query.obs[f"predicted_{KEY}"].astype(str), first.obs[f"predicted_{KEY}"].astype(str))
    np.testing.assert_array_equal(query.obsm["X_transcriptformer"], first.obsm["X_transcriptformer"])
    assert query.uns["annotation"]["summary"][KEY]["cells"] == query.n_obs
    index = ReferenceIndex.load(from_checkpoint["index"])
    again = model.annotate(ad.read_h5ad(files["query"]), index)
    assert again[f"predicted_{KEY}"].astype(str).equals(frame[f"predicted_{KEY}"].astype(str))


def test_a_soma_experiment_with_its_embeddings_array_as_reference(files, from_checkpoint, tmp_path):
    """The reference's embeddings read from ``inference --output-soma``'s array, not recomputed: the same labels."""
    from test_soma import write_experiment

    experiment = write_experiment(files["reference"], tmp_path / "soma")
    array = tmp_path / "reference.soma"
    inference = ["inference", "--checkpoint-path", REFERENCE_DIR, "--soma", experiment, "--output-soma", array]
    assert main([str(a) for a in (*inference, "--output-path", tmp_path / "inference", "-q")]) == 0
    output = tmp_path / "out"
    arguments = annotate(
        "--checkpoint-path", REFERENCE_DIR, "--reference-soma", experiment, "--reference-embeddings", array,
        "--label-key", KEY, "--data-file", files["query"], "--no-figures", "--output-path", output,
    )  # fmt: skip
    assert quietly_main(arguments) == 0
    result = ad.read_h5ad(output / "annotated.h5ad")
    first = from_checkpoint["output"]
    np.testing.assert_array_equal(result.obs[f"predicted_{KEY}"].astype(str), first.obs[f"predicted_{KEY}"].astype(str))


@pytest.mark.slow  # three runs of the command (about 40 s on two busy cores)
def test_a_soma_experiment_embedded_by_the_checkpoint_as_reference(files, from_checkpoint, tmp_path):
    """Without an embeddings array the reference's SOMA cells are embedded, streamed as inference reads them."""
    from test_soma import write_experiment

    experiment = write_experiment(files["reference"], tmp_path / "soma")
    output, index = tmp_path / "out", tmp_path / "index"
    arguments = annotate(
        "--checkpoint-path", REFERENCE_DIR, "--reference-soma", experiment, "--label-key", KEY, "--chunk-size", 100,
        "--data-file", files["query"], "--save-index", index, "--no-figures", "--output-path", output,
    )  # fmt: skip
    assert quietly_main(arguments) == 0
    result, first = ad.read_h5ad(output / "annotated.h5ad"), from_checkpoint["output"]
    np.testing.assert_array_equal(result.obs[f"predicted_{KEY}"].astype(str), first.obs[f"predicted_{KEY}"].astype(str))
    np.testing.assert_allclose(result.obs[f"{KEY}_confidence"], first.obs[f"{KEY}_confidence"], rtol=1e-5)
    reference = ad.read_h5ad(files["reference"])
    assert ReferenceIndex.load(index).n_cells == reference.n_obs
    filtered = annotate(
        "--checkpoint-path", REFERENCE_DIR, "--reference-soma", experiment, "--obs-filter", f"{KEY} != 'astrocyte'",
        "--label-key", KEY, "--data-file", files["query"], "--no-figures", "--output-path", tmp_path / "filtered",
    )  # fmt: skip
    assert quietly_main(filtered) == 0
    labels = ad.read_h5ad(tmp_path / "filtered" / "annotated.h5ad").obs[f"predicted_{KEY}"].astype(str)
    assert "astrocyte" not in set(labels) and "astrocyte" in set(first.obs[f"predicted_{KEY}"].astype(str))
    again = annotate(
        "--checkpoint-path", REFERENCE_DIR, "--index", index, "--data-file", files["query"], "--no-figures",
        "--output-path", tmp_path / "again",
    )  # fmt: skip
    assert quietly_main(again) == 0
    reused = ad.read_h5ad(tmp_path / "again" / "annotated.h5ad").obs[f"predicted_{KEY}"].astype(str)
    np.testing.assert_array_equal(reused, result.obs[f"predicted_{KEY}"].astype(str))


@pytest.mark.parametrize(
    "extra, words",
    [
        (
            ["--checkpoint-path", str(REFERENCE_DIR), "--reference", "REFERENCE", "--reference-embeddings", "a.soma"],
            ["--reference-embeddings", "SOMA"],
        ),
        (["--reference-census", "stable", "--obsm-key", "X_pca"], ["--reference-embeddings", "--checkpoint-path"]),
    ],
    ids=["embeddings-of-a-file", "census-without-embeddings"],
)
def test_census_reference_arguments_are_checked_before_anything_is_read(files, tmp_path, capsys, extra, words):
    extra = [str(files["reference"]) if e == "REFERENCE" else e for e in extra]
    output = tmp_path / "out"
    code, err = run_cli(
        capsys, *annotate(*extra, "--label-key", KEY, "--data-file", files["query"], "--output-path", output)
    )
    assert_one_line_error(code, err, "annotate", *words)
    assert_no_output(output)


def test_mistakes_are_one_line_before_any_compute(files, embedded, tmp_path, capsys):
    output = tmp_path / "out"
    common = ["--data-file", files["query"], "--output-path", output]
    cases = [
        (["--reference", files["reference"], "--label-key", "celltype", "--obsm-key", "X_pca"], ["'celltype'"]),
        (["--reference", files["reference"], "--label-key", KEY], ["--checkpoint-path", "--obsm-key"]),
        (["--reference", files["reference"], "--obsm-key", "X_pca"], ["--label-key"]),
        (["--reference", files["reference"], "--label-key", KEY, "--obsm-key", "X_umap"], ["X_umap", "X_pca"]),
        (
            ["--reference", embedded["reference"], "--reference-obsm", "embeddings", "--query-obsm", "X_pca"]
            + ["--label-key", KEY],
            ["30 dimensions", "same model"],
        ),
        (
            ["--reference", files["reference"], "--label-key", KEY, "--checkpoint-path", REFERENCE_DIR]
            + ["--obsm-key", "X_pca"],
            ["--obsm-key", "--checkpoint-path"],
        ),
        (
            ["--reference", files["reference"], "--label-key", KEY, "--checkpoint-path", REFERENCE_DIR]
            + ["--true-key", "celltype"],  # before the reference is embedded
            ["--true-key", "'celltype'", "cell_type"],
        ),
    ]
    for extra, words in cases:
        code, err = run_cli(capsys, *annotate(*extra, *common))
        assert_one_line_error(code, err, "annotate", *words)
        assert_no_output(output)


def test_labels_all_missing_and_one_cell_classes(files, tmp_path, capsys):
    reference = ad.read_h5ad(files["reference"])
    reference.obs["empty"] = np.nan
    reference.write_h5ad(tmp_path / "reference.h5ad")
    output = tmp_path / "out"
    common = ["--reference", tmp_path / "reference.h5ad", "--data-file", files["query"], "--obsm-key", "X_pca"]
    code, err = run_cli(capsys, *annotate(*common, "--label-key", "empty", "--output-path", output))
    assert_one_line_error(code, err, "annotate", "'empty'", "missing")
    assert_no_output(output)
    code, err = run_cli(capsys, *annotate(*common, "--label-key", KEY, "--no-figures", "--output-path", output))
    assert code == 0
    assert "warning" in err and "'cholinergic neuron' (1 cell)" in err


def test_a_query_without_genes_of_the_vocabulary_is_one_line(files, tmp_path, capsys):
    query = ad.read_h5ad(files["query"])
    query.var["ensembl_id"] = [f"NOT_A_GENE_{i}" for i in range(query.n_vars)]
    query.write_h5ad(tmp_path / "query.h5ad")
    output = tmp_path / "out"
    arguments = annotate(
        "--checkpoint-path", REFERENCE_DIR, "--reference", files["reference"], "--label-key", KEY,
        "--data-file", tmp_path / "query.h5ad", "--output-path", output,
    )  # fmt: skip
    code, err = run_cli(capsys, *arguments)
    assert_one_line_error(code, err, "annotate")
    assert_no_output(output)


def test_dry_run_checks_and_plans_without_embedding(files, tmp_path, capsys):
    output = tmp_path / "out"
    common = ["--reference", files["reference"], "--data-file", files["query"], "--output-path", output]
    arguments = annotate("--checkpoint-path", REFERENCE_DIR, "--label-key", KEY, "--dry-run", *common)
    assert quietly_main(arguments) == 0
    printed = capsys.readouterr().out
    assert "Reference: 678 cells, label keys cell_type" in printed and "Dry run: nothing is written." in printed
    assert not output.exists()
    arguments = annotate("--checkpoint-path", REFERENCE_DIR, "--label-key", "nope", "--dry-run", *common)
    code, err = run_cli(capsys, *arguments)
    assert_one_line_error(code, err, "annotate", "'nope'")
