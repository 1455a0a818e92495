"""Property tests (hypothesis) over the numeric and gene-list parameters of perturb, annotate and screen.

Whatever the input, a run either ends with one clear line naming what to fix (a ``UserError``, or the ``ValueError``
or ``KeyError`` of a setting's validator; argparse's usage error for a flag's type) or returns finite outputs. The
reference checkpoint and a few of its cells keep each example fast; values that broke a command before are pinned
with ``@example``.
"""

import contextlib
import io
import math
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

import transcriptformer
from conftest import REFERENCE_DIR, REFERENCE_INPUT
from test_generate_inputs import NOT_FINITE
from test_properties import examples
from transcriptformer.cli import main
from transcriptformer.errors import UserError

# Gene names as a user writes them: symbols and ids of the data and the '+' of a combined perturbation; else an id of
# another species, unknown, empty or repeated names.
GENES = ["Htr7", "Gzmk", "Sema3c", "ENSMUSG00000024798", "Htr7+Gzmk"]
BAD_GENES = ("ENSG00000141510", "NotAGene", "", "Htr7+Htr7", "Htr7++Gzmk", " ")
COUNTS = ["", "=1", "=3.5", "=100"]
BAD_COUNTS = ("=0", "=-1", "=nan", "=inf", "=1e-300", "=1e40", "=abc", "=", "=1=2")


@pytest.fixture(scope="module")
def model() -> transcriptformer.TranscriptFormerModel:
    return transcriptformer.load(REFERENCE_DIR, device="cpu")


@pytest.fixture(scope="module")
def cells() -> ad.AnnData:
    return ad.read_h5ad(REFERENCE_INPUT)


def one_line(error: BaseException) -> str:
    """The message of ``error``, checked to be one short line."""
    message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    assert message and "\n" not in message and len(message) < 800, message
    return message


def refusal(error: BaseException, words) -> None:
    """Record a refused input and check that its one-line message names one of ``words`` (a setting or the subject)."""
    message = one_line(error)
    event("refused")
    assert any(word in message for word in words), message


def finite(values) -> bool:
    """Whether the numbers of a table or an array are finite where they are not NaN (NaN marks a missing value)."""
    if isinstance(values, pd.DataFrame):
        values = values.select_dtypes("number").astype(float).to_numpy()
    values = np.asarray(values.toarray() if hasattr(values, "toarray") else values, dtype=float)
    return bool(np.isfinite(values[~np.isnan(values)]).all())


def one_bad(valid: dict[str, st.SearchStrategy], bad: dict[str, tuple]) -> st.SearchStrategy[dict]:
    """Settings drawn from ``valid``; every other time, one of them replaced by one of its ``bad`` values."""
    good = st.fixed_dictionaries(valid)
    change = st.sampled_from(sorted(bad)).flatmap(lambda name: st.tuples(st.just(name), st.sampled_from(bad[name])))
    broken = st.tuples(good, change).map(lambda drawn: drawn[0] | {drawn[1][0]: drawn[1][1]})
    return st.one_of(good, broken)


def genes_of(gene: st.SearchStrategy, max_size: int) -> st.SearchStrategy[list]:
    return st.lists(gene, max_size=max_size)


PERTURB = one_bad(
    {
        "knock_out": genes_of(st.sampled_from(GENES), 3),
        "over_express": genes_of(st.tuples(st.sampled_from(GENES), st.sampled_from(COUNTS)).map("".join), 2),
        "top_genes": st.integers(0, 5000),
        "chunk_size": st.integers(1, 8),
        "batch_size": st.integers(1, 16),
        "max_tokens": st.one_of(st.none(), st.integers(64, 10**6)),
    },
    {
        "knock_out": tuple([gene] for gene in BAD_GENES) + ("Htr7", ["Htr7", "Htr7"]),
        "over_express": tuple([f"Htr7{count}"] for count in BAD_COUNTS) + tuple([gene] for gene in BAD_GENES),
        "top_genes": (-1, 10**30, 2.5, float("nan")),
        "chunk_size": (0, -3, 10**30),
        "batch_size": (0, -1, 10**30, True),
        "max_tokens": (0, -1, 1, 10**30),
    },
)


@given(settings=PERTURB)
@example(settings=dict(over_express=["Htr7=1e-300"], top_genes=5, chunk_size=2, batch_size=4))  # knocked out
@example(settings=dict(knock_out=["Htr7"], top_genes=5, chunk_size=2, batch_size=4, max_tokens=1))
@examples(25)
def test_perturb_returns_finite_effects_or_a_clear_error(model, cells, settings):
    try:
        result = model.perturb(cells[:3].copy(), **settings)
    except (UserError, ValueError, KeyError) as error:
        refusal(error, (*settings, "gene"))
        return
    event("perturbed")
    assert settings.get("knock_out") or settings.get("over_express"), "a run without perturbations must be refused"
    assert finite(result.summary) and finite(result.genes)
    assert all(finite(layer) for layer in result.cells.layers.values())
    counts = [float(name.partition("=")[2]) for name in settings.get("over_express", []) if "=" in name]
    assert all(math.isfinite(c) and c > 0 for c in counts), counts  # a count that is not a positive number is refused


def reference_labels(cells: ad.AnnData, kind: str) -> pd.Series:
    """A label column of ``cells`` of the ``kind`` a user might give."""
    types = cells.obs["cell_type"].astype(str).to_numpy()
    column = {
        "types": types,
        "numbers": np.arange(cells.n_obs) % 3,  # non-string labels
        "with_nan": np.where(np.arange(cells.n_obs) % 4 == 0, None, types),
        "all_nan": np.full(cells.n_obs, np.nan),
        "one_class": np.full(cells.n_obs, "neuron"),
    }[kind]
    return pd.Series(column, index=cells.obs_names)


ANNOTATE = one_bad(
    {
        "labels": st.sampled_from(["types", "numbers", "with_nan"]),
        "label_key": st.just("cell_type"),
        "n_neighbors": st.integers(1, 60),
        "false_unknown_rate": st.floats(0, 0.99),
        "metric": st.sampled_from(["cosine", "euclidean"]),
        "reject": st.booleans(),
        "batch_size": st.integers(1, 64),
    },
    {
        "labels": ("all_nan", "one_class"),
        "label_key": ("a/b", "", "missing", " "),
        "n_neighbors": (0, -1, 10**30, 2.5),
        "false_unknown_rate": (-0.1, 1.0, 1.5, *NOT_FINITE),
        "metric": ("manhattan", ""),
        "batch_size": (0, -1),
    },
)


@given(settings=ANNOTATE)
@example(settings=dict(labels="types", label_key="cell_type", n_neighbors=10**30))  # numpy's error, not a line
@example(settings=dict(labels="types", label_key="a/b", n_neighbors=5))  # obs columns h5ad files cannot hold
@examples(10)
def test_annotate_returns_finite_confidences_or_a_clear_error(model, cells, settings):
    settings = dict(settings)
    labels, label_key = settings.pop("labels"), settings.pop("label_key")
    reference, query = cells[:48].copy(), cells[48:52].copy()
    if label_key != "missing":
        reference.obs[label_key] = reference_labels(reference, labels)
    try:
        table = model.annotate(query, reference, label_key, **settings)
    except (UserError, ValueError, KeyError) as error:
        refusal(error, (*settings, "label"))
        return
    event("annotated")
    assert label_key == "cell_type" and labels != "all_nan"
    assert len(table) == query.n_obs and finite(table)
    confidence = table[f"{label_key}_confidence"].to_numpy(dtype=float)
    assert ((confidence >= 0) & (confidence <= 1 + 1e-6)).all()
    with tempfile.TemporaryDirectory() as folder:
        query.write_h5ad(Path(folder) / "annotated.h5ad")  # the written-into AnnData stays writable


SCREEN = one_bad(
    {
        "genes": st.one_of(st.none(), genes_of(st.sampled_from(GENES[:4]), 4)),
        "max_genes_per_cell": st.integers(0, 50),
        "null_bins": st.integers(1, 20),
        "kind": st.sampled_from(["--knock-out", "--over-express"]),
        "batch_size": st.integers(1, 16),
        "states": st.just(()),
    },
    {
        "genes": ([], ["NotAGene"], ["", " "], ["  Htr7  ", "htr7"], ["Htr7", "Htr7"]),
        "max_genes_per_cell": (-1, 10**30, "x"),
        "null_bins": (0, -2, 10**30),
        "batch_size": (0, -1),
        "states": (("--start-state", "cell_type=a"), ("--goal-state", "x"), ("--start-state", "=")),
    },
)


@given(settings=SCREEN)
@example(settings=dict(max_genes_per_cell=10**30, null_bins=2, kind="--knock-out", batch_size=4))  # OverflowError
@examples(8)
def test_screen_writes_finite_tables_or_a_clear_error(settings):
    genes, states, kind = settings.get("genes"), settings.get("states", ()), settings["kind"]
    max_genes, null_bins, batch_size = settings["max_genes_per_cell"], settings["null_bins"], settings["batch_size"]
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stderr(io.StringIO()) as stderr:
        output = Path(folder) / "out"
        args = ["screen", "--checkpoint-path", REFERENCE_DIR, "--data-file", REFERENCE_INPUT, "--output-path", output,
                kind, "all", "--obs-filter", "cell_type == 'microglial cell'", "--max-genes-per-cell", max_genes,
                "--null-bins", null_bins, "--batch-size", batch_size, *states, "--quiet"]  # fmt: skip
        if genes is not None:
            (Path(folder) / "genes.txt").write_text("\n".join(genes))
            args += ["--genes-file", Path(folder) / "genes.txt"]
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as usage_error:  # argparse: a flag's value of the wrong type
            code = usage_error.code
        err = stderr.getvalue()
        assert "Traceback" not in err
        if code != 0:
            event("refused")
            assert code in (1, 2) and err.strip().splitlines()[-1].startswith("transcriptformer screen: error:"), err
            assert not (output / "screen_genes.csv").exists()
            return
        event("screened")
        assert 0 <= int(max_genes) and int(null_bins) >= 1 and not states
        pairs = pd.read_parquet(output / "screen_pairs.parquet")
        genes_table = pd.read_csv(output / "screen_genes.csv")
        assert len(pairs) > 0 and finite(pairs) and finite(genes_table)
        assert ad.read_h5ad(output / "screen.h5ad").obs["n_pairs"].sum() == len(pairs)  # a row per screened cell
