"""Prefix reuse for perturbed variants (model/prefix.py) equals the full forward pass on real cells.

Variants are built at the count level, as in-silico perturbations are, and tokenized as any cell: a knock-out
takes a gene out of the sequence (later genes move left; in a cell cut at ``seq_len`` the next gene enters at the
end), an over-expression gives a gene a new count (a gene the cell lacks enters at its place in ``var`` order).
"""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import transcriptformer
from conftest import DATA_DIR, REFERENCE_DIR
from transcriptformer.model.outputs import PERTURBATION_KEYS
from transcriptformer.model.prefix import plan_passes, predict_variants

DEMO_MODEL = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"
HELDOUT = DATA_DIR / "demo_mouse_brain_heldout.h5ad"


@pytest.fixture(scope="module")
def reference():
    model = transcriptformer.load(REFERENCE_DIR, device="cpu")
    return model.model, model.tokenize(REFERENCE_DIR / "input.h5ad")


@pytest.fixture(scope="module")
def demo():
    model = transcriptformer.load(DEMO_MODEL, device="cpu")
    return model.model, model.tokenize(HELDOUT)


def with_counts(cells, row: int, edits: list[tuple[int, float]]):
    """Cells: one variant of cell ``row`` per ``(column, count)`` edit."""
    dense = np.repeat(cells.counts[row].toarray(), len(edits), axis=0)
    for i, (column, count) in enumerate(edits):
        dense[i, column] = count
    return dataclasses.replace(
        cells,
        counts=sp.csr_matrix(dense),
        aux_tokens=np.repeat(cells.aux_tokens[row : row + 1], len(edits), axis=0),
        obs_names=pd.Index([cells.obs_names[row]] * len(edits)),
    )


def screen(cells, rows: list[int], edits_of):
    """The cells ``rows`` and their variants (``edits_of(row)``) as model inputs.

    Trimmed, as the batch loop trims, to one position past the longest possible variant (one gene more than its
    cell), at most ``seq_len``.
    """
    length = min(cells.seq_len, int(cells.n_tokens()[rows].max()) + 2)
    tokens, counts, cell_of = [], [], []
    for index, row in enumerate(rows):
        variants = with_counts(cells, row, edits_of(row))
        batch = variants.batch(np.arange(len(variants)), length)
        tokens.append(batch.gene_tokens)
        counts.append(batch.gene_counts)
        cell_of += [index] * len(variants)
    return cells.batch(rows, length), torch.cat(tokens), torch.cat(counts), torch.tensor(cell_of)


def knock_outs(cells):
    return lambda row: [(int(column), 0.0) for column in cells.counts[row].indices]


def assert_equals_full_path(net, cell_batch, tokens, counts, cell_of, keys, **kwargs):
    cell_tokens, cell_counts, aux_tokens = cell_batch.gene_tokens, cell_batch.gene_counts, cell_batch.aux_tokens
    got = predict_variants(net, cell_tokens, cell_counts, aux_tokens, tokens, counts, cell_of, keys, **kwargs)
    want = net.predict(tokens, counts, cell_batch.aux_tokens[cell_of], keys)
    for key in keys:
        assert got[key].shape == want[key].shape, key
        # 1e-5 relative, to each output's largest value (an embedding entry near 0 has no relative precision)
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5 * float(want[key].abs().max()), msg=key)
    return got


@pytest.mark.parametrize("max_tokens", [2000, 16384])
def test_knock_outs_of_every_expressed_gene_equal_the_full_path_reference(reference, max_tokens):
    net, cells = reference
    length = cells.seq_len
    short = int(np.flatnonzero(cells.n_tokens() < length // 2)[0])
    cut = int(np.flatnonzero(np.diff(cells.counts.indptr) > length + 5)[0])  # more genes than seq_len
    cell_batch, tokens, counts, cell_of = screen(cells, [short, cut], knock_outs(cells))
    cut_variants = tokens[cell_of == 1]
    # A knock-out of a gene in the sequence lets the next gene in at the last position; one after the cut does not.
    entered = ~torch.isin(cut_variants[:, -1], cell_batch.gene_tokens[1])
    assert 0 < int(entered.sum()) < len(cut_variants)
    assert_equals_full_path(net, cell_batch, tokens, counts, cell_of, net.output_keys, max_tokens=max_tokens)


@pytest.mark.slow  # the full path on every knock-out of three cells: about 30 s on two cores
def test_knock_outs_of_every_expressed_gene_equal_the_full_path_demo(demo):
    net, cells = demo
    rows = [int(row) for row in np.argsort(cells.n_tokens())[[10, 50, 90]]]  # short, median, long cells
    cell_batch, tokens, counts, cell_of = screen(cells, rows, knock_outs(cells))
    got = assert_equals_full_path(net, cell_batch, tokens, counts, cell_of, (*PERTURBATION_KEYS, "gene_llh", "llh"))
    # Per-position outputs keep predict's layout: position j holds the value of the variant's gene there.
    assert torch.all((got["mu"] > 0) == (tokens != net.special_tokens.pad))


def test_over_expressions_equal_the_full_path(demo, reference):
    for net, cells in (demo, reference):
        rows = [0, int(np.flatnonzero(cells.n_tokens() == cells.n_tokens().max())[0])]

        def over_expressions(row: int, cells=cells) -> list[tuple[int, float]]:
            present = cells.counts[row].indices
            absent = np.setdiff1d(np.arange(cells.counts.shape[1]), present)
            highest = float(cells.counts[row].max())
            # genes the cell lacks enter the sequence at their place; expressed genes get a new count in place
            return [(int(c), highest) for c in absent[:: max(1, len(absent) // 12)]] + [(int(present[3]), 7.0)]

        cell_batch, tokens, counts, cell_of = screen(cells, rows, over_expressions)
        assert_equals_full_path(net, cell_batch, tokens, counts, cell_of, PERTURBATION_KEYS, max_tokens=2000)


def test_a_variant_equal_to_its_cell_gets_the_cells_outputs(reference):
    net, cells = reference
    cell_batch = cells.batch([3, 4], 64)
    tokens, counts = cell_batch.gene_tokens[[1, 0, 1]], cell_batch.gene_counts[[1, 0, 1]]
    assert_equals_full_path(net, cell_batch, tokens, counts, torch.tensor([1, 0, 1]), net.output_keys)


def test_shapes_that_do_not_go_together_are_refused(reference):
    net, cells = reference
    batch = cells.batch([0, 1], 40)
    with pytest.raises(ValueError, match=r"variant_cell has shape \(1,\), expected \(2,\)"):
        predict_variants(
            net, batch.gene_tokens, batch.gene_counts, batch.aux_tokens, batch.gene_tokens, batch.gene_counts,
            torch.tensor([0]), ("embeddings",),
        )  # fmt: skip
    with pytest.raises(ValueError, match="no variants to run"):
        predict_variants(
            net, batch.gene_tokens, batch.gene_counts, batch.aux_tokens, batch.gene_tokens[:0], batch.gene_counts[:0],
            torch.tensor([], dtype=torch.long), ("embeddings",),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"variant_cell must index the 2 cells"):
        predict_variants(
            net, batch.gene_tokens, batch.gene_counts, batch.aux_tokens, batch.gene_tokens, batch.gene_counts,
            torch.tensor([0, 2]), ("embeddings",),
        )  # fmt: skip


def test_passes_cover_every_variant_once_within_the_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 500, size=40).repeat(60)
    starts = np.minimum(rng.integers(1, 500, size=lengths.size), lengths)
    passes = plan_passes(starts, lengths, max_tokens=4096)
    covered = np.concatenate([p.variants for p in passes])
    assert np.array_equal(np.sort(covered), np.arange(lengths.size))
    for p in passes:
        assert p.start == starts[p.variants].min() and p.length == lengths[p.variants].max()
        assert len(p.variants) == 1 or len(p.variants) * (p.length - p.start + 1) <= 4096
    size = sum(len(p.variants) * (p.length - p.start + 1) for p in passes)
    assert size < 0.7 * (lengths.sum())  # far fewer positions than running every variant in full
