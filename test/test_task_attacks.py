"""Bad input to score, perturb, annotate, screen and SOMA output that used to crash or ran: one line, no output.

Each case is what an adversarial user tried: a huge number that passed the flag's type check, a list naming a column
twice, a label key that names no writable column, a genes file of no expressed gene or of another encoding, an
output inside the input. The reference checkpoint and a few of its cells keep each run short.
"""

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import REFERENCE_DIR, REFERENCE_INPUT, assert_no_output
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.cli import main

HUGE = "99999999999999999999999"


@pytest.fixture(scope="module")
def few_cells(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cells") / "cells.h5ad"
    ad.read_h5ad(REFERENCE_INPUT)[:6].copy().write_h5ad(path)
    return path


def command(name: str, data: Path, output: Path, *extra) -> list:
    return [name, "--checkpoint-path", REFERENCE_DIR, "--data-file", data, "--output-path", output, *extra]


@pytest.mark.parametrize(
    ("name", "extra", "words"),
    [  # a number of any size passed the flag's type check, then failed in h5py or Python's C integers
        ("perturb", ["--knock-out", "Htr7", "--top-genes", HUGE], ["--top-genes", "<= 1000000"]),
        ("screen", ["--knock-out", "all", "--max-genes-per-cell", HUGE], ["--max-genes-per-cell", "<= 1000000"]),
        ("screen", ["--knock-out", "all", "--null-bins", HUGE], ["--null-bins", "<= 1000000"]),
        (
            "annotate",
            ["--reference", REFERENCE_INPUT, "--label-key", "cell_type", "--n-neighbors", HUGE],
            ["--n-neighbors", "<= 2048"],
        ),  # fmt: skip
    ],
)
def test_huge_numbers_are_one_line_errors_before_any_work(capsys, tmp_path, few_cells, name, extra, words):
    output = tmp_path / "out"
    code, err = run_cli(capsys, *command(name, few_cells, output, *extra))
    assert_one_line_error(code, err, name, *words)
    assert not output.exists()


@pytest.mark.parametrize("name", ["score", "inference"])
def test_an_obs_column_named_twice_is_one_line(capsys, tmp_path, few_cells, name):
    """Before, the run computed every cell and failed in pandas with a traceback, leaving its parts."""
    output = tmp_path / "out"
    code, err = run_cli(capsys, *command(name, few_cells, output, "--obs-keys", "cell_type", "assay", "cell_type"))
    assert_one_line_error(code, err, name, "--obs-keys names ['cell_type'] more than once")
    assert not output.exists()


@pytest.mark.parametrize("key", ["a/b", " "])
def test_annotate_refuses_a_label_key_that_cannot_name_output_columns(capsys, tmp_path, few_cells, key):
    reference = ad.read_h5ad(REFERENCE_INPUT)[:40].copy()
    reference.obs[key] = reference.obs["cell_type"]
    reference.write_h5ad(tmp_path / "reference.h5ad")
    output = tmp_path / "out"
    args = command("annotate", few_cells, output, "--reference", tmp_path / "reference.h5ad", "--label-key", key)
    code, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "annotate", f"label key {key!r} cannot name the output columns", "plain name")
    assert_no_output(output)


def test_annotate_names_a_reference_of_no_cells_and_a_save_index_that_is_a_file(capsys, tmp_path, few_cells):
    ad.read_h5ad(REFERENCE_INPUT)[:0].copy().write_h5ad(tmp_path / "empty.h5ad")
    args = command("annotate", few_cells, tmp_path / "out", "--label-key", "cell_type")
    code, err = run_cli(capsys, *args, "--reference", tmp_path / "empty.h5ad")
    assert_one_line_error(code, err, "annotate", "the reference holds no cells")
    (tmp_path / "index").write_text("a file of the user's")
    code, err = run_cli(capsys, *args, "--reference", REFERENCE_INPUT, "--save-index", tmp_path / "index")
    assert_one_line_error(code, err, "annotate", "--save-index", "is a file", "new folder")
    assert (tmp_path / "index").read_text() == "a file of the user's"
    assert_no_output(tmp_path / "out")


def test_a_screen_of_cells_without_a_screened_gene_is_one_line(capsys, tmp_path, few_cells):
    """Cells that express no gene of the genes file (or no gene at all): numpy's error before, mid-run."""
    cells = ad.read_h5ad(few_cells)
    expressed = np.asarray((cells.X > 0).sum(axis=0)).ravel() > 0
    unexpressed = cells.var.loc[~expressed, "ensembl_id"].iloc[0]
    (tmp_path / "genes.txt").write_text(f"{unexpressed}\n")
    output = tmp_path / "out"
    args = command("screen", few_cells, output, "--knock-out", "all", "--genes-file", tmp_path / "genes.txt")
    code, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "screen", "found no gene to perturb in the cells selected")
    assert_no_output(output)


def test_a_screen_of_some_empty_cells_screens_the_others(tmp_path, few_cells):
    cells = ad.read_h5ad(few_cells)
    counts = cells.X.toarray() if hasattr(cells.X, "toarray") else np.array(cells.X)
    counts[1:] = 0
    cells.X = counts
    cells.write_h5ad(tmp_path / "mostly_empty.h5ad")
    output = tmp_path / "out"
    args = command("screen", tmp_path / "mostly_empty.h5ad", output, "--knock-out", "all", "--max-genes-per-cell", "3")
    assert main([str(arg) for arg in [*args, "--quiet"]]) == 0
    pairs = pd.read_parquet(output / "screen_pairs.parquet")
    assert set(pairs["cell"]) == {cells.obs_names[0]} and len(pairs) == 3
    assert np.isfinite(pairs[["cosine_shift", "delta_log_likelihood"]].to_numpy()).all()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--genes-file", "LATIN1"], ["--genes-file", "is not a UTF-8 text file"]),
        (
            ["--start-state", "cell_type=astrocyte", "--goal-state", "cell_type=astrocyte"],
            ["--start-state and --goal-state are both", "goal of other cells"],
        ),  # fmt: skip
    ],
)
def test_screen_settings_that_name_nothing_to_do_are_one_line(capsys, tmp_path, few_cells, extra, words):
    (tmp_path / "LATIN1").write_bytes("Htr7\nG\xe9ne\n".encode("latin-1"))
    extra = [tmp_path / value if value == "LATIN1" else value for value in extra]
    output = tmp_path / "out"
    code, err = run_cli(capsys, *command("screen", few_cells, output, "--knock-out", "all", *extra))
    assert_one_line_error(code, err, "screen", *words)
    assert_no_output(output)


def test_an_output_soma_inside_the_input_experiment_is_refused(capsys, tmp_path):
    from test_soma import write_experiment

    experiment = write_experiment(REFERENCE_INPUT, tmp_path / "soma")
    inside = Path(experiment) / "ms" / "embeddings"
    code, err = run_cli(capsys, "inference", "--checkpoint-path", REFERENCE_DIR, "--soma", experiment,
                        "--output-path", tmp_path / "out", "--output-soma", inside)  # fmt: skip
    assert_one_line_error(code, err, "inference", "--output-soma", "inside the input experiment", "outside it")
    assert not inside.exists()
