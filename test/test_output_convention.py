"""One output convention across commands, and commands chained on each other's outputs.

The obsm key of the cell embeddings and its alias, output names and folders, the input's counts kept on request,
``Output: <path>`` as the last line.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest

from conftest import DATA_DIR, REFERENCE_DIR, REFERENCE_INPUT, assert_no_output
from test_architecture import flag_defaults
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.cli import main
from transcriptformer.engine.config import EMBEDDING_ALIAS, EMBEDDING_KEY, default_output_path

DEMO = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"
HELDOUT = DATA_DIR / "demo_mouse_brain_heldout.h5ad"


def last_line(capsys) -> str:
    return capsys.readouterr().out.splitlines()[-1]


@pytest.mark.parametrize(
    "command", ["inference", "score", "perturb", "screen", "annotate", "generate", "predict-labels"]
)
def test_each_command_writes_into_a_folder_of_its_own(command):
    assert (
        flag_defaults(command)["output_path"]
        == default_output_path(command)
        == f"./{command}_results".replace("predict-labels", "predict_labels")
    )


def test_output_names_follow_one_rule_and_the_path_is_the_last_line(tmp_path, monkeypatch, capsys):
    """``.h5ad`` is added to a name without it, by every command; the default folder is the command's."""
    monkeypatch.chdir(tmp_path)
    args = ["--checkpoint-path", DEMO, "--num-cells", 2, "--library-size", 10, "--max-genes", 5, "--output-filename"]
    assert main(["generate", *map(str, args), "cells", "-q"]) == 0
    assert last_line(capsys) == f"Output: {tmp_path / 'generate_results' / 'cells.h5ad'}"
    generated = ad.read_h5ad(tmp_path / "generate_results" / "cells.h5ad")
    assert generated.var.columns[:2].tolist() == ["ensembl_id", "symbol"]
    assert generated.var.loc["ENSMUSG00000045515", "symbol"] == "Pou3f3"  # from the bundled table

    args = ["--checkpoint-path", REFERENCE_DIR, "--data-file", REFERENCE_INPUT, "--output-filename", "cells"]
    assert main(["score", *map(str, args), "-q"]) == 0
    assert last_line(capsys) == f"Output: {tmp_path / 'score_results' / 'cells.h5ad'}"  # after the outlier line


def test_generated_cells_keep_the_prompt_file_gene_columns(tmp_path, capsys):
    args = ["--checkpoint-path", DEMO, "--data-file", HELDOUT, "--num-cells", 2, "--max-genes", 5]
    assert main(["generate", *map(str, args), "--output-path", str(tmp_path), "-q"]) == 0
    var = ad.read_h5ad(tmp_path / "generated.h5ad").var
    inputs = ad.read_h5ad(HELDOUT).var.set_index("ensembl_id")
    shared = var.index.intersection(inputs.index)
    assert len(shared) == 1024  # the genes of the file in the vocabulary
    assert var.drop(shared)["gene_name"].isna().all()  # the vocabulary's others: missing, as the file lacks them
    assert (var.loc[shared, "gene_name"] == inputs.loc[shared, "gene_name"]).all()
    assert (var.loc[shared, "symbol"] == inputs.loc[shared, "gene_name"]).mean() > 0.95  # the bundled table agrees


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    """``inference`` of the demo model's held-out cells, with their counts (``--keep-counts``)."""
    output = tmp_path_factory.mktemp("embedded")
    args = ["--checkpoint-path", DEMO, "--data-file", HELDOUT, "--output-path", output, "--keep-counts"]
    assert main(["inference", *map(str, args), "-q"]) == 0
    return output / "embeddings.h5ad"


def test_the_cell_embeddings_are_stored_once_under_both_keys(embedded):
    with h5py.File(embedded) as f:
        assert f["obsm"][EMBEDDING_ALIAS] == f["obsm"][EMBEDDING_KEY]  # one dataset, a hard link
    adata = ad.read_h5ad(embedded)
    np.testing.assert_array_equal(adata.obsm[EMBEDDING_ALIAS], adata.obsm[EMBEDDING_KEY])


def test_keep_counts_writes_the_outputs_into_a_copy_of_the_input(embedded, tmp_path):
    written, source = ad.read_h5ad(embedded), ad.read_h5ad(HELDOUT)
    assert written.obs_names.equals(source.obs_names) and written.var_names.equals(source.var_names)
    assert (written.X != source.X).nnz == 0 and written.X.dtype == source.X.dtype
    assert written.obs[source.obs.columns].equals(source.obs)
    assert (written.var[source.var.columns] == source.var).all().all()

    # per-gene outputs sit on the input's genes: those of a run without --keep-counts, moved to their columns
    args = ["--checkpoint-path", REFERENCE_DIR, "--data-file", REFERENCE_INPUT, "--output-keys", "llh", "mu"]
    assert main(["inference", *map(str, args), "--output-path", str(tmp_path / "kept"), "--keep-counts", "-q"]) == 0
    assert main(["inference", *map(str, args), "--output-path", str(tmp_path / "plain"), "-q"]) == 0
    kept, plain = (
        ad.read_h5ad(tmp_path / "kept" / "embeddings.h5ad"),
        ad.read_h5ad(tmp_path / "plain" / "embeddings.h5ad"),
    )
    source = ad.read_h5ad(REFERENCE_INPUT)
    assert kept.n_vars == source.n_vars > plain.n_vars and (kept.X != source.X).nnz == 0
    columns = kept.var_names.get_indexer(plain.var["input_var_name"])
    assert (kept.layers["mu"][:, columns] != plain.layers["mu"]).nnz == 0
    assert kept.layers["mu"].nnz == plain.layers["mu"].nnz  # nothing for the genes the vocabulary lacks
    np.testing.assert_array_equal(kept.obs["llh"], plain.obs["llh"])


def test_keep_counts_of_several_files_is_a_one_line_error(tmp_path, capsys):
    output = tmp_path / "out"
    flags = ["--checkpoint-path", REFERENCE_DIR, "--data-file", REFERENCE_INPUT, REFERENCE_INPUT, "--keep-counts"]
    code, err = run_cli(capsys, "inference", *flags, "--output-path", output)
    assert_one_line_error(code, err, "inference", "--keep-counts copies the counts of one input file", "--data-file")
    assert_no_output(output)


def test_commands_whose_rows_are_not_the_cells_have_no_keep_counts():
    assert "keep_counts" not in flag_defaults("perturb") and "keep_counts" not in flag_defaults("screen")


@pytest.mark.slow  # evaluate's classifiers, Leiden and UMAP: 25-110 s on two cores
def test_inference_then_evaluate(embedded, tmp_path, capsys):
    """The embeddings of ``inference --keep-counts`` beside the PCA baseline of the counts it kept.

    Without ``--keep-counts`` the output has no counts for the PCA baseline, which evaluate computes always.
    """
    report = tmp_path / "report"
    args = ["--data-file", embedded, "--label-key", "cell_type", "--obsm-key", EMBEDDING_KEY, "--output-path", report]
    assert main(["evaluate", *map(str, args), "-q"]) == 0
    assert last_line(capsys) == f"Output: {report.resolve()}"
    results = json.loads((report / "results.json").read_text())
    assert {EMBEDDING_KEY, "pca"} <= set(results["methods"])


@pytest.mark.slow  # evaluate: 25 s on two cores
def test_score_then_evaluate(tmp_path, capsys):
    scored, report = tmp_path / "scored", tmp_path / "report"
    keys = ["embeddings", "log_likelihood", "mean_log_likelihood"]
    args = ["--checkpoint-path", DEMO, "--data-file", HELDOUT, "--output-path", scored, "--keep-counts"]
    assert main(["score", *map(str, args), "--output-keys", *keys, "-q"]) == 0
    assert last_line(capsys) == f"Output: {scored.resolve() / 'scores.h5ad'}"
    args = ["--data-file", scored / "scores.h5ad", "--label-key", "cell_type", "--obsm-key", EMBEDDING_KEY]
    assert main(["evaluate", *map(str, args), "--output-path", str(report), "-q"]) == 0
    assert (report / "results.json").is_file() and last_line(capsys) == f"Output: {report.resolve()}"


def test_files_of_either_key_are_read_by_evaluate_and_annotate(embedded, tmp_path, capsys):
    """A file written before the key moved (``embeddings`` only) and one of the Python API (the new key only)."""
    before, api = ad.read_h5ad(embedded), ad.read_h5ad(embedded)
    del before.obsm[EMBEDDING_KEY], api.obsm[EMBEDDING_ALIAS]
    before.write_h5ad(tmp_path / "before.h5ad")
    api.write_h5ad(tmp_path / "api.h5ad")
    predicted = {}
    for name, key in [("before", EMBEDDING_KEY), ("api", EMBEDDING_ALIAS)]:  # each asked by the key it lacks
        output = tmp_path / f"annotated_{name}"
        args = ["--reference", tmp_path / "api.h5ad", "--label-key", "cell_type", "--data-file"]
        args += [tmp_path / f"{name}.h5ad", "--obsm-key", key, "--no-figures", "--output-path", output]
        assert main(["annotate", *map(str, args), "-q"]) == 0
        assert last_line(capsys) == f"Output: {(output / 'annotated.h5ad').resolve()}"
        predicted[name] = ad.read_h5ad(output / "annotated.h5ad").obs["predicted_cell_type"].astype(str)
    assert predicted["before"].equals(predicted["api"])
    assert (predicted["api"] == before.obs["cell_type"].astype(str)).mean() > 0.5  # most, some called Unknown
    code, err = run_cli(capsys, "evaluate", "--data-file", tmp_path / "before.h5ad", "--label-key", "cell_type",
                        "--obsm-key", "X_other", "--output-path", tmp_path / "report")  # fmt: skip
    assert_one_line_error(code, err, "evaluate", "X_other", EMBEDDING_ALIAS)
