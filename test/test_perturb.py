"""In-silico perturbation with the trained demo model on real held-out mouse brain cells.

Genes are chosen from the data (the gene expressed by the most cells, one expressed by none, one of the vocabulary
that the file lacks), never hard-coded results; expected effects are computed independently with ``predict``.
"""

import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import transcriptformer
from conftest import DATA_DIR, assert_no_output
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.cli import main
from transcriptformer.data.gene_symbols import symbols_by_id
from transcriptformer.perturbation.specs import parse_perturbations
from transcriptformer.perturbation.variants import Variants

DEMO = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"
HELDOUT = DATA_DIR / "demo_mouse_brain_heldout.h5ad"
N_CELLS = 24


@pytest.fixture(scope="module")
def model() -> transcriptformer.TranscriptFormerModel:
    return transcriptformer.load(DEMO, device="cpu")


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    """The first held-out cells."""
    return ad.read_h5ad(HELDOUT)[:N_CELLS].copy()


@pytest.fixture(scope="module")
def cells(model, adata):
    """The first held-out cells, tokenized."""
    return model.tokenize(adata)


@dataclasses.dataclass
class Genes:
    common: str  # expressed by the most cells
    second: str  # expressed by the next most
    unexpressed: str  # read from the file, expressed by none of its cells
    absent: str  # in the vocabulary, not in the file


@pytest.fixture(scope="module")
def genes(model, cells) -> Genes:
    expressing = np.asarray((cells.counts > 0).sum(axis=0)).ravel()
    order = np.argsort(-expressing, kind="stable")
    absent = next(g for g in model.checkpoint.gene_vocab.gene_ids if g not in set(cells.gene_ids))
    whole_file = model.tokenize(HELDOUT)
    unexpressed = whole_file.gene_ids[np.flatnonzero(whole_file.counts.sum(axis=0).A1 == 0)[0]]
    return Genes(cells.gene_ids[order[0]], cells.gene_ids[order[1]], unexpressed, absent)


def expressing(cells, gene: str) -> np.ndarray:
    column = list(cells.gene_ids).index(gene)
    return np.flatnonzero(cells.counts[:, column].toarray().ravel() > 0)


def variants_of(model, cells, knock_out=(), over_express=()) -> Variants:
    vocab = model.checkpoint.gene_vocab
    return Variants(cells, parse_perturbations(knock_out, over_express, vocab), vocab)


def model_inputs(cells, rows) -> tuple[np.ndarray, np.ndarray]:
    """Padded tokens and counts of ``rows``, as a batch holds them."""
    batch = cells.batch(rows)
    return batch.gene_tokens.numpy(), batch.gene_counts.numpy()


@pytest.fixture(scope="module")
def result(model, adata, genes):
    """One run of five perturbations.

    Knock-outs of an expressed gene, of an unexpressed one and of two genes together; over-expressions to a given
    count and of a gene that the file lacks.
    """
    return model.perturb(
        adata,
        knock_out=[genes.common, genes.unexpressed, f"{genes.common}+{genes.second}"],
        over_express=[f"{genes.second}=100", genes.absent],
        batch_size=16,
    )


def test_knocking_out_an_unexpressed_gene_changes_nothing_and_runs_nothing(model, adata, genes):
    result = model.perturb(adata, knock_out=[genes.unexpressed])
    assert result.inputs_run == 0
    assert result.summary["n_affected"].tolist() == [0]
    assert not result.cells.obs["affected"].any()
    assert (result.cells.obs["cosine_shift"] == 0).all()
    assert result.cells.X.nnz == 0
    assert result.genes.empty


def test_knocking_out_a_gene_removes_exactly_that_gene_from_the_input(model, cells, genes):
    variants = variants_of(model, cells, knock_out=[genes.common])
    changed = variants.changed[0]
    np.testing.assert_array_equal(changed, expressing(cells, genes.common))
    token = model.checkpoint.gene_vocab[genes.common]
    after_tokens, after_counts = model_inputs(variants.take(np.zeros(len(changed), int), changed), range(len(changed)))
    before_tokens, before_counts = model_inputs(cells, changed)
    pad = cells.pad_index
    for i in range(len(changed)):
        keep = (before_tokens[i] != token) & (before_tokens[i] != pad)
        n = keep.sum()
        assert n == (before_tokens[i] != pad).sum() - 1
        np.testing.assert_array_equal(after_tokens[i, :n], before_tokens[i][keep])
        np.testing.assert_array_equal(after_counts[i, :n], before_counts[i][keep])
        assert (after_tokens[i, n:] == pad).all()


def test_knocking_out_a_gene_of_a_cut_cell_lets_the_next_gene_enter(model, cells, genes):
    column = list(cells.gene_ids).index(genes.common)
    rows = expressing(cells, genes.common)
    place = np.array([list(cells.sequence(row)[0]).index(column) for row in rows])
    length = int(np.median(place)) + 1  # cells are cut to this many genes: some keep the gene, others do not
    inside = rows[(place < length) & (cells.n_tokens()[rows] > length)]
    beyond = rows[place >= length]
    assert len(inside) and len(beyond), "the data should hold both cases"
    cut = dataclasses.replace(cells, seq_len=length)
    variants = variants_of(model, cut, knock_out=[genes.common])
    np.testing.assert_array_equal(variants.changed[0], rows[place < length])
    for row in inside:
        cols = cells.sequence(row)[0]
        after = variants.take(np.array([0]), np.array([row])).sequence(0)[0]
        np.testing.assert_array_equal(after, cols[cols != column][:length])  # the next gene enters at the end


def test_over_expression_puts_the_gene_where_the_gene_order_implies_with_its_count_clipped(model, cells, genes):
    clip = cells.data_config.clip_counts
    variants = variants_of(model, cells, over_express=[f"{genes.second}=100", genes.absent])
    token, absent_token = (model.checkpoint.gene_vocab[g] for g in (genes.second, genes.absent))
    column = list(cells.gene_ids).index(genes.second)
    not_expressing = np.setdiff1d(np.arange(len(cells)), expressing(cells, genes.second))
    assert set(not_expressing) <= set(variants.changed[0])
    for row in not_expressing[:5]:
        cols, counts = cells.sequence(row)
        place = int((cols < column).sum())  # var order: after the cell's genes of lower columns
        tokens, values = variants.take(np.array([0]), np.array([row])).inputs(0)
        np.testing.assert_array_equal(np.delete(tokens, place), cells.gene_tokens[cols])
        assert tokens[place] == token and values[place] == min(100, clip)
        tokens, values = variants.take(np.array([1]), np.array([row])).inputs(0)  # a gene the file lacks: last
        assert tokens[-1] == absent_token and values[-1] == min(cells.counts[row].max(), clip)
        np.testing.assert_array_equal(tokens[:-1], cells.gene_tokens[cols])


def test_over_expression_follows_a_count_order(model, cells, genes):
    by_count = dataclasses.replace(cells, data_config=dataclasses.replace(cells.data_config, sort_genes=True))
    variants = variants_of(model, by_count, over_express=[f"{genes.second}=7"])
    token = model.checkpoint.gene_vocab[genes.second]
    for row in variants.changed[0][:5]:
        tokens, values = variants.take(np.array([0]), np.array([row])).inputs(0)
        assert values[list(tokens).index(token)] == 7
        assert (np.diff(values) <= 0).all()


def test_an_over_expression_that_leaves_the_clipped_count_as_it_is_is_unaffected(model, cells):
    clip = cells.data_config.clip_counts
    at_clip = np.asarray((cells.counts >= clip).sum(axis=0)).ravel()
    gene = cells.gene_ids[at_clip.argmax()]
    assert at_clip.max() > 0
    variants = variants_of(model, cells, over_express=[f"{gene}={clip * 2:g}"])
    column = list(cells.gene_ids).index(gene)
    rows_at_clip = np.flatnonzero(cells.counts[:, column].toarray().ravel() >= clip)
    assert not set(rows_at_clip) & set(variants.changed[0])
    assert len(variants.changed[0]) == len(cells) - len(rows_at_clip)


def test_summary_counts_affected_cells_and_averages_their_shifts(result, cells, genes):
    summary, obs = result.summary, result.cells.obs
    ko, none, both = (f"ko:{genes.common}", f"ko:{genes.unexpressed}", f"ko:{genes.common}+{genes.second}")
    union = np.union1d(expressing(cells, genes.common), expressing(cells, genes.second))
    assert summary.loc[ko, "n_affected"] == len(expressing(cells, genes.common))
    assert summary.loc[none, "n_affected"] == 0
    assert summary.loc[both, "n_affected"] == len(union)
    assert summary.loc[f"oe:{genes.absent}", "n_affected"] == N_CELLS
    assert (summary["n_cells"] == N_CELLS).all()
    rows = obs[(obs["perturbation"] == ko) & obs["affected"]]
    assert summary.loc[ko, "mean_cosine_shift"] == pytest.approx(rows["cosine_shift"].mean())
    assert summary.loc[ko, "median_cosine_shift"] == pytest.approx(rows["cosine_shift"].median())
    assert (rows["total_count_after"] < rows["total_count_before"]).all()


def test_cosine_shift_is_zero_for_unaffected_cells_and_positive_for_affected_ones(result):
    obs = result.cells.obs
    assert (obs.loc[~obs["affected"], ["cosine_shift", "delta_log_likelihood"]] == 0).all().all()
    assert (obs.loc[obs["affected"], "cosine_shift"] > 0).all()
    n_pairs = result.cells.n_obs
    assert result.inputs_run == int(obs["affected"].sum()) + len(set(obs.loc[obs["affected"], "cell"]))
    assert n_pairs == len(result.summary) * N_CELLS


def test_effects_are_those_of_the_perturbed_and_unperturbed_cells_run_alone(model, cells, genes, result):
    """Recompute the effects of a few cells with ``predict`` and compare."""
    keys = ["embeddings", "mu", "log_likelihood", "mean_log_likelihood"]
    variants = variants_of(model, cells, knock_out=[genes.common])
    rows = variants.changed[0][:3]
    before = model.predict(cells, output_keys=keys)
    after = model.predict(variants.take(np.zeros(len(rows), int), rows), output_keys=keys)
    name = f"ko:{genes.common}"
    column = list(cells.gene_ids).index(genes.common)
    for i, row in enumerate(rows):
        effects = result.cells[f"{name}|{cells.obs_names[row]}"]
        old, new = before["embeddings"][row], after["embeddings"][i]
        cosine = old @ new / np.linalg.norm(old) / np.linalg.norm(new)
        assert effects.obs["cosine_shift"].item() == pytest.approx(1 - cosine, rel=1e-3, abs=1e-7)
        delta = after["log_likelihood"][i] - before["log_likelihood"][row]
        assert effects.obs["delta_log_likelihood"].item() == pytest.approx(delta, rel=1e-4, abs=1e-4)
        old_mu = pd.Series(before["mu"][row], index=before["gene_token_indices"][row])
        new_mu = pd.Series(after["mu"][i], index=after["gene_token_indices"][i])
        others = old_mu.index[(old_mu.index != cells.pad_index) & (old_mu.index != cells.gene_tokens[column])]
        expected = new_mu[others] - old_mu[others]
        got = pd.Series(effects.X.toarray().ravel(), index=model.checkpoint.gene_vocab.lookup(effects.var_names))
        assert effects.X.nnz == len(others)
        np.testing.assert_allclose(got[others], expected, rtol=1e-4, atol=1e-5)
        shares = effects.layers["delta_share"].toarray().sum()
        assert shares == pytest.approx(0, abs=1e-6)  # the other genes' shares sum to 1 before and after


def test_the_gene_table_ranks_genes_by_their_score(result, genes):
    table = result.genes
    ko = table[table["perturbation"] == f"ko:{genes.common}"]
    assert list(ko["rank"]) == list(range(1, len(ko) + 1))
    strength = ko["score"].abs().to_numpy()
    ranked = strength[~np.isnan(strength)]
    assert (np.diff(ranked) <= 0).all() and np.isnan(strength[len(ranked) :]).all()
    assert len(ko) <= 50 and genes.common not in set(ko["gene_id"])
    obs, X = result.cells.obs, result.cells.X.tocsc()
    top = ko.iloc[0]
    column = list(result.cells.var_names).index(top["gene_id"])
    in_perturbation = (obs["perturbation"] == f"ko:{genes.common}").to_numpy()
    entries = X[:, column].tocsr()[in_perturbation]
    assert top["n_cells"] == entries.nnz
    assert top["mean_delta_mu"] == pytest.approx(entries.data.mean(), rel=1e-5)
    assert top["symbol"] == symbols_by_id().get(top["gene_id"], "")


def test_results_do_not_depend_on_batch_size_or_chunking(model, adata, genes):
    subset = adata[:8].copy()
    args = dict(knock_out=[genes.common], over_express=[f"{genes.second}=5"])
    runs = [
        model.perturb(subset, **args, batch_size=1),
        model.perturb(subset, **args, batch_size=7, chunk_size=5),
        model.perturb(subset, **args, batch_size=64, chunk_size=1),
    ]
    reference = model.perturb(subset, **args, batch_size=64)
    numbers = ["cosine_shift", "delta_log_likelihood", "delta_mean_log_likelihood"]
    for run in runs:
        assert run.inputs_run == reference.inputs_run
        pd.testing.assert_series_equal(run.cells.obs["affected"], reference.cells.obs["affected"])
        # The deltas are differences of log-likelihoods of hundreds of nats, summed in float32: a float32 spacing
        # there is 6e-5, and another batch may round a sum one or two spacings apart.
        np.testing.assert_allclose(run.cells.obs[numbers], reference.cells.obs[numbers], rtol=1e-4, atol=2.5e-4)
        got, want = run.cells.X, reference.cells.X
        np.testing.assert_array_equal(got.indptr, want.indptr)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_allclose(got.data, want.data, rtol=1e-4, atol=1e-5)
        pd.testing.assert_frame_equal(run.summary, reference.summary, rtol=1e-3)


def test_genes_are_named_by_id_or_symbol(model, genes):
    vocab = model.checkpoint.gene_vocab
    symbol = symbols_by_id()[genes.common]
    names = [genes.common, f"{genes.common}.4", symbol, symbol.upper(), symbol.lower()]
    perturbations = parse_perturbations(names, [], vocab)
    assert [p.gene_ids for p in perturbations] == [(genes.common,)] * 3  # a symbol in any case is one perturbation
    assert [p.name for p in perturbations] == [f"ko:{genes.common}", f"ko:{genes.common}.4", f"ko:{symbol}"]
    with pytest.raises(
        KeyError, match=f"is not in the checkpoint's vocabulary; close matches in the vocabulary: .*{symbol}"
    ):
        parse_perturbations([symbol[:-1] + "x" + symbol[-1]], [], vocab)


def test_the_command_writes_tables_and_an_anndata_that_scanpy_reads(tmp_path, genes, capsys):
    scanpy = pytest.importorskip("scanpy")
    output, data = tmp_path / "out", tmp_path / "cells.h5ad"
    ad.read_h5ad(HELDOUT)[:N_CELLS].write_h5ad(data)
    args = ["perturb", "--checkpoint-path", DEMO, "--data-file", data, "--output-path", output]
    assert main([str(a) for a in [*args, "--knock-out", genes.unexpressed, genes.common, "--top-genes", "5"]]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"Output: {(output / 'perturbations.h5ad').resolve()}"
    cells = scanpy.read_h5ad(output / "perturbations.h5ad")
    assert list(cells.obs["perturbation"].cat.categories) == [f"ko:{genes.unexpressed}", f"ko:{genes.common}"]
    # each row carries its input cell's obs columns (cell_type, ..., source_file as inference) after its own
    inputs = ad.read_h5ad(data).obs
    assert list(cells.obs.columns[-len(inputs.columns) - 1 :]) == [*inputs.columns, "source_file"]
    for column in ("cell_type", "assay"):
        expected = inputs.loc[cells.obs["cell"], column].to_numpy()
        np.testing.assert_array_equal(cells.obs[column].to_numpy(dtype=str), expected.astype(str))
    assert cells.uns["perturb"]["knock_out"].tolist() == [genes.unexpressed, genes.common]
    summary = pd.read_csv(output / "summary.csv", index_col="perturbation")
    assert summary.loc[f"ko:{genes.unexpressed}", "n_affected"] == 0
    assert len(pd.read_csv(output / "genes.csv")) == 5
    code, err = run_cli(capsys, *args, "--knock-out", genes.common)
    assert_one_line_error(code, err, "perturb", "exists", "--overwrite")


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--knock-out", "Pou3f"], ["--knock-out 'Pou3f'", "close matches", "Pou3f3"]),
        (["--over-express", "Pou3f3=abc"], ["--over-express 'Pou3f3=abc'", "GENE=COUNT"]),
        (["--over-express", "Pou3f3=-2"], ["not a number above 0"]),
        (["--over-express", "Pou3f3=1e-300"], ["--over-express 'Pou3f3=1e-300'", "not a number above 0", "float32"]),
        (["--over-express", "Pou3f3=1e300"], ["not a number above 0 that a count matrix (float32) holds"]),
        (["--knock-out", "Pou3f3=0"], ["--knock-out 'Pou3f3=0'", "takes no count", "--over-express"]),
        (["--knock-out", "Pou3f3+Pou3f3"], ["names a gene twice"]),
        ([], ["nothing to perturb", "--knock-out", "--over-express"]),
    ],
    ids=[
        "unknown-gene",
        "count-not-a-number",
        "negative-count",
        "count-float32-rounds-to-0",
        "count-float32-rounds-to-inf",
        "knock-out-count",
        "gene-twice",
        "nothing",
    ],
)
def test_mistakes_are_one_line_errors(tmp_path, capsys, flags, words):
    output = tmp_path / "out"
    args = ["perturb", "--checkpoint-path", DEMO, "--data-file", HELDOUT, "--output-path", output, *flags]
    code, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "perturb", *words)
    assert_no_output(output)


def test_the_output_keeps_its_anndata_layout(result, cells, genes):
    result_cells = result.cells
    assert result_cells.obs_names.is_unique
    assert set(result_cells.layers) == {"delta_mu", "log2_fold_change", "delta_share", "log2_share_fold_change"}
    assert (result_cells.X != result_cells.layers["delta_mu"]).nnz == 0
    # the gene axis is the input's genes: an over-expressed gene that the input lacks is edited, without effects
    assert result_cells.var.index.name == "gene_id" and list(result_cells.var_names) == list(cells.gene_ids)
    assert genes.absent not in set(result_cells.var_names)
    for layer in result_cells.layers.values():
        np.testing.assert_array_equal(layer.indptr, result_cells.X.indptr)
