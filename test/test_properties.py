"""Property-based tests (hypothesis) of the tokenizer, the attention backends and the batch loop.

Over random count matrices (shapes, zeros, ties, dtypes, dense or sparse, in memory or in an ``.h5ad``), gene
orders and tokenizer settings, and over random attention shapes, padding and counts:

* nothing crashes;
* how counts are stored (dtype, format, file) never changes a token or a count;
* the tokens follow the rule of ``DataConfig``: expressed genes only (``pad_zeros``), highest counts first
  (``sort_genes``, ties in input column order) or in input column order, truncated to ``seq_len``, normalised
  over the genes kept, clipped;
* sorted by count, the order of the input's genes changes no token, except among genes of equal count: they keep
  the input's order (a stable sort), so their order, and which of them fill the last places of a full sequence,
  follow the input (normalised counts may differ in the last float32 bit: their sum is taken in another order);
* the attention backends (chunked, dense, and flex run eagerly on the CPU) agree with the score formula;
* padding and batch mates never change a result: of a tokenized cell, of an attention row, or of a cell's model
  outputs with the reference checkpoint (per-position outputs are 0 where the input is padding).

Each property runs a few dozen examples (``max_examples``) so that the file stays within about 20 seconds (the
flex test, slower, is marked slow); the examples are drawn afresh on every run, except under CI (``CI`` set),
where they are the same on every run.
"""

import dataclasses
import os
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from test_masks import dense_reference
from transcriptformer.config import PredictConfig
from transcriptformer.data.tokenize import CellTokenizer, TokenizedCells
from transcriptformer.model.attention import build_attention_inputs, chunked_attend, flex_attend
from transcriptformer.pipeline import predict_positions

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
CPU = torch.device("cpu")


def examples(n: int) -> settings:
    """Hypothesis settings: ``n`` examples, no deadline (the machine is shared), fixed examples under CI."""
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=bool(os.environ.get("CI")),
        suppress_health_check=[HealthCheck.too_slow],
    )


# ---------------------------------------------------------------------------------------------------- tokenizer

# Counts drawn with many zeros, many ties, and values above the reference checkpoint's clip_counts (30).
COUNT_VALUES = [0, 0, 0, 0, 1, 1, 2, 3, 5, 30, 31, 1000, 100_000]
DTYPES = [np.int32, np.int64, np.float32, np.float64]
FORMATS = ["dense", "csr", "csc", "csr_array", "csr, unsorted, explicit zeros"]


@pytest.fixture(scope="module")
def checkpoint(reference_model):
    return reference_model.checkpoint


@dataclasses.dataclass
class Cells:
    """A random AnnData's parts: ``(n_cells, n_genes)`` integer counts and the gene id of each column."""

    counts: np.ndarray
    gene_ids: list[str]
    known: np.ndarray  # (n_genes,) bool: the gene is in the vocabulary

    def anndata(self, counts=None) -> ad.AnnData:
        obs = pd.DataFrame(
            {"assay": (["MERFISH", "not in the vocabulary"] * len(self.counts))[: len(self.counts)]},
            index=[f"cell{i}" for i in range(len(self.counts))],
        )
        var = pd.DataFrame({"ensembl_id": self.gene_ids}, index=[f"gene{j}" for j in range(len(self.gene_ids))])
        return ad.AnnData(self.counts.astype(np.float32) if counts is None else counts, obs=obs, var=var)

    def permuted(self, order: np.ndarray) -> "Cells":
        return Cells(self.counts[:, order], [self.gene_ids[j] for j in order], self.known[order])


@st.composite
def random_cells(draw, vocab_genes: list[str], max_cells: int = 6, max_genes: int = 24) -> Cells:
    n_cells, n_genes = draw(st.integers(1, max_cells)), draw(st.integers(1, max_genes))
    counts = draw(hnp.arrays(np.int64, (n_cells, n_genes), elements=st.sampled_from(COUNT_VALUES)))
    known = np.array(draw(st.lists(st.booleans(), min_size=n_genes, max_size=n_genes)))
    known[draw(st.integers(0, n_genes - 1))] = True  # at least one gene the model knows
    picks = draw(st.lists(st.integers(0, len(vocab_genes) - 1), min_size=n_genes, max_size=n_genes, unique=True))
    gene_ids = [vocab_genes[p] if k else f"ENSMUSG9{p:010d}" for p, k in zip(picks, known, strict=True)]
    return Cells(counts, gene_ids, known)


tokenizer_settings = st.fixed_dictionaries(
    {
        "sort_genes": st.booleans(),
        "pad_zeros": st.booleans(),
        "clip_counts": st.sampled_from([None, 2.0, 30.0]),
        "normalize_to_scale": st.sampled_from([0.0, 0.0, 1000.0]),
    }
)


def make_tokenizer(checkpoint, seq_len: int, config: dict) -> CellTokenizer:
    return dataclasses.replace(checkpoint.tokenizer(**config), seq_len=seq_len)


def stored_as(counts: np.ndarray, dtype: type, form: str):
    """The same counts in another dtype and matrix format."""
    x = counts.astype(dtype)
    if form == "dense":
        return x
    if form == "csc":
        return sp.csc_matrix(x)
    if form == "csr_array":
        return sp.csr_array(x)
    matrix = sp.csr_matrix(x)
    if form == "csr":
        return matrix
    # Every entry stored, zeros included, with the columns of each row in reverse order.
    rows, cols = np.nonzero(np.ones_like(x))
    reverse = np.lexsort([-cols, rows])
    indptr = np.arange(0, x.size + 1, x.shape[1])
    return sp.csr_matrix((x[rows, cols][reverse], cols[reverse], indptr), shape=x.shape)


def tokens_and_counts(tokenized: TokenizedCells) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batch = tokenized.batch(np.arange(len(tokenized)))
    return batch.gene_tokens.numpy(), batch.gene_counts.numpy(), tokenized.n_tokens()


@pytest.fixture(scope="module")
def vocab_genes(checkpoint) -> list[str]:
    return checkpoint.gene_vocab.gene_ids


@given(data=st.data())
@examples(25)
def test_how_counts_are_stored_changes_no_token(checkpoint, vocab_genes, data):
    cells = data.draw(random_cells(vocab_genes))
    tokenizer = make_tokenizer(checkpoint, data.draw(st.integers(1, 30)), data.draw(tokenizer_settings))
    dtype, form = data.draw(st.sampled_from(DTYPES)), data.draw(st.sampled_from(FORMATS))
    expected = tokens_and_counts(tokenizer.tokenize(cells.anndata()))

    adata = cells.anndata(stored_as(cells.counts, dtype, form))
    if data.draw(st.booleans(), label="read from an .h5ad file"):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "cells.h5ad"
            adata.write_h5ad(path)
            got = tokens_and_counts(tokenizer.tokenize(path))
    else:
        got = tokens_and_counts(tokenizer.tokenize(adata))

    for actual, desired in zip(got, expected, strict=True):
        np.testing.assert_array_equal(actual, desired)


@given(data=st.data())
@examples(40)
def test_tokens_follow_the_data_config(checkpoint, vocab_genes, data):
    cells = data.draw(random_cells(vocab_genes))
    seq_len, config = data.draw(st.integers(1, 30)), data.draw(tokenizer_settings)
    tokenizer = make_tokenizer(checkpoint, seq_len, config)
    tokens, counts, n_tokens = tokens_and_counts(tokenizer.tokenize(cells.anndata()))
    vocab, pad = checkpoint.gene_vocab, checkpoint.gene_vocab.special("[PAD]")
    known_columns = np.flatnonzero(cells.known)
    assert tokens.shape == counts.shape == (len(cells.counts), seq_len)

    for cell, raw in enumerate(cells.counts.astype(np.float32)):
        expressed = known_columns[raw[known_columns] > 0]
        if config["sort_genes"]:  # highest count first; equal counts in input column order
            order = expressed[np.argsort(-raw[expressed], kind="stable")]
        else:
            order = expressed
        if not config["pad_zeros"]:  # then the known genes that are not expressed, in column order
            order = np.concatenate([order, np.setdiff1d(known_columns, expressed)])
        kept = order[:seq_len]
        values = raw[kept]
        if config["normalize_to_scale"] and values.any():  # over the genes kept, as the original release does
            values = values / values.sum() * np.float32(config["normalize_to_scale"])
        if config["clip_counts"] is not None:
            values = np.minimum(values, config["clip_counts"])
        if config["pad_zeros"]:
            kept, values = kept[values > 0], values[values > 0]
        assert n_tokens[cell] == (kept.size if config["pad_zeros"] else min(known_columns.size, seq_len))
        np.testing.assert_array_equal(tokens[cell, : kept.size], vocab.lookup([cells.gene_ids[j] for j in kept]))
        np.testing.assert_allclose(counts[cell, : kept.size], values, rtol=1e-6)
        assert (tokens[cell, kept.size :] == pad).all() and (counts[cell, kept.size :] == 0).all()


@given(data=st.data())
@examples(25)
def test_gene_order_changes_no_token_when_sorted_by_count(checkpoint, vocab_genes, data):
    cells = data.draw(random_cells(vocab_genes))
    config = data.draw(tokenizer_settings) | {"sort_genes": True, "pad_zeros": True}
    tokenizer = make_tokenizer(checkpoint, data.draw(st.integers(1, 30)), config)
    order = np.array(data.draw(st.permutations(range(len(cells.gene_ids)))))
    tokens, counts, n_tokens = tokens_and_counts(tokenizer.tokenize(cells.anndata()))
    shuffled_tokens, shuffled_counts, shuffled_n = tokens_and_counts(
        tokenizer.tokenize(cells.permuted(order).anndata())
    )

    np.testing.assert_array_equal(shuffled_n, n_tokens)
    np.testing.assert_allclose(shuffled_counts, counts, rtol=1e-6)
    vocab = checkpoint.gene_vocab
    for cell, raw in enumerate(cells.counts):
        # Genes of equal count come in input column order: only their order, and which of the genes of the
        # smallest kept count are kept when the sequence is full, depend on the input's gene order.
        expressed = raw * cells.known
        kept = n_tokens[cell]
        if kept == 0:
            continue
        smallest_kept = np.sort(expressed[expressed > 0])[::-1][kept - 1]
        for value in np.unique(expressed[expressed > smallest_kept]):
            genes = vocab.lookup([cells.gene_ids[j] for j in np.flatnonzero(expressed == value)])
            assert set(tokens[cell, :kept][np.isin(tokens[cell, :kept], genes)]) == set(genes)
            assert set(shuffled_tokens[cell, :kept][np.isin(shuffled_tokens[cell, :kept], genes)]) == set(genes)
        if len(np.unique(expressed[expressed > 0])) == np.count_nonzero(expressed):  # no ties: the same sequence
            np.testing.assert_array_equal(shuffled_tokens[cell], tokens[cell])


@given(data=st.data())
@examples(25)
def test_padding_and_batch_mates_change_no_tokens(checkpoint, vocab_genes, data):
    cells = data.draw(random_cells(vocab_genes))
    seq_len, config = data.draw(st.integers(1, 30)), data.draw(tokenizer_settings)
    tokenized = make_tokenizer(checkpoint, seq_len, config).tokenize(cells.anndata())
    rows = np.array(data.draw(st.permutations(range(len(tokenized)))))
    length = data.draw(st.integers(int(tokenized.n_tokens().max()), seq_len))
    batch = tokenized.batch(rows, length)
    for i, row in enumerate(rows):
        alone = tokenized.batch([row])  # full length
        np.testing.assert_array_equal(batch.gene_tokens[i], alone.gene_tokens[0, :length])
        np.testing.assert_array_equal(batch.gene_counts[i], alone.gene_counts[0, :length])
        np.testing.assert_array_equal(batch.aux_tokens[i], alone.aux_tokens[0])
        assert (alone.gene_tokens[0, length:] == tokenized.pad_index).all()


# ---------------------------------------------------------------------------------------------------- attention

# Float32 rounding of differently ordered sums, and float64's.
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10}
ANY_LENGTH = st.integers(1, 48)
ANY_DTYPE = st.sampled_from([torch.float32, torch.float64])
# Flex attention runs eagerly on the CPU, traced anew for each new shape: few lengths keep its test shorter.
FLEX_LENGTHS = st.sampled_from([1, 17, 48])


@st.composite
def attention_problems(draw, lengths=ANY_LENGTH, dtypes=ANY_DTYPE):
    """Queries, keys, values ``(B, H, N, D)``, counts and padding ``(B, N)`` and the score settings."""
    batch, heads, length = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(lengths)
    head_dim = draw(st.sampled_from([1, 4, 16]))
    dtype = draw(dtypes)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator, dtype=dtype) for _ in range(3))
    scale = draw(st.sampled_from([1.0, 10.0]))  # large scores exercise the softcap
    is_pad = torch.tensor(draw(hnp.arrays(bool, (batch, length))))
    counts = torch.tensor(draw(hnp.arrays(np.float32, (batch, length), elements=st.sampled_from([0, 1, 2, 30, 1e4]))))
    counts = counts.masked_fill(is_pad, 0)
    options = {"eps": 1e-6, "cap": draw(st.sampled_from([0.0, 10.0])), "embed_mode": draw(st.booleans())}
    return q * scale, k, v, counts, is_pad, options


def attend(backend: str, q, k, v, counts, is_pad, options, max_score_elements: int | None = None) -> torch.Tensor:
    inputs = build_attention_inputs(counts.to(q.dtype), is_pad, backend=backend, **options)
    if backend == "flex":
        return flex_attend(q, k, v, inputs)
    if backend == "chunked" and max_score_elements is not None:
        inputs.max_score_elements = max_score_elements
    return chunked_attend(q, k, v, inputs)


def assert_attention_close(actual: torch.Tensor, desired: torch.Tensor, msg: str = "") -> None:
    tolerance = TOLERANCE[desired.dtype]
    torch.testing.assert_close(actual, desired, rtol=tolerance, atol=tolerance, msg=msg)


def reference_attention(q, k, v, counts, is_pad, options) -> torch.Tensor:
    """The score formula written out on one dense matrix (test_masks.dense_reference).

    That reference always caps; no cap (``cap`` 0) is a cap far above every score there.
    """
    cap = options["cap"] or 1e30
    return dense_reference(q, k, v, counts.to(q.dtype), is_pad, options["eps"], cap, options["embed_mode"])


@given(problem=attention_problems(), rows_per_block=st.integers(1, 64))
@examples(40)
def test_chunked_and_dense_attention_agree_with_the_formula(problem, rows_per_block):
    q, k, v, counts, is_pad, options = problem
    batch, heads, length, _ = q.shape
    expected = reference_attention(*problem)
    dense = attend("dense", *problem)
    assert torch.isfinite(dense).all()
    assert_attention_close(dense, expected, "dense")
    chunked = attend("chunked", *problem, max_score_elements=batch * heads * length * rows_per_block)
    assert_attention_close(chunked, expected, "chunked")
    # A query that sees no key (only padding at and before it) gets zeros.
    blind = torch.cumsum(~is_pad, 1) == 0  # (B, N)
    assert (dense.transpose(1, 2)[blind] == 0).all()


@pytest.mark.slow  # eager flex attention is traced anew for each new shape, seconds each
@given(problem=attention_problems(lengths=FLEX_LENGTHS, dtypes=st.just(torch.float32)))
@examples(20)
def test_flex_attention_agrees_with_the_formula(problem):
    assert_attention_close(attend("flex", *problem), reference_attention(*problem), "flex")


@given(problem=attention_problems(), backend=st.sampled_from(["chunked", "dense"]), data=st.data())
@examples(30)
def test_padding_and_batch_mates_change_no_attention_output(problem, backend, data):
    q, k, v, counts, is_pad, options = problem
    whole = attend(backend, *problem)
    # Other values at padded keys change nothing.
    noise = torch.randn_like(k) * is_pad[:, None, :, None]
    assert_attention_close(attend(backend, q, k + noise, v - noise, counts, is_pad, options), whole, "pad values")
    # More padding at the end changes nothing before it.
    extra = data.draw(st.integers(1, 20))
    grown = [torch.cat([x, torch.randn(*x.shape[:2], extra, x.shape[3], dtype=x.dtype)], 2) for x in (q, k, v)]
    grown_pad = torch.cat([is_pad, torch.ones(is_pad.shape[0], extra, dtype=torch.bool)], 1)
    grown_counts = torch.cat([counts, torch.zeros(counts.shape[0], extra)], 1)
    longer = attend(backend, *grown, grown_counts, grown_pad, options)
    assert_attention_close(longer[:, :, : q.shape[2]], whole, "trailing padding")
    # Each row alone gives its row of the batch.
    for b in range(q.shape[0]):
        alone = attend(backend, q[b : b + 1], k[b : b + 1], v[b : b + 1], counts[b : b + 1], is_pad[b : b + 1], options)
        assert_attention_close(alone, whole[b : b + 1], f"row {b} alone")


# ---------------------------------------------------------------------------------------------------- batch loop

MODEL_KEYS = ("embeddings", "llh", "gene_llh", "mu", "cge")


@pytest.fixture(scope="module")
def reference(reference_model, reference_input):
    return reference_model, reference_model.tokenize(reference_input)


def subset(cells: TokenizedCells, rows: list[int]) -> TokenizedCells:
    rows = np.asarray(rows)
    return dataclasses.replace(
        cells, counts=cells.counts[rows], aux_tokens=cells.aux_tokens[rows], obs_names=cells.obs_names[rows]
    )


# Cells drawn from a few of the reference cells, of lengths from the shortest to full length.
POOL_SIZE = 10


@pytest.fixture(scope="module")
def pool(reference) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """Some reference cells, and the outputs of each computed alone (a batch of one, trimmed to its length)."""
    model, cells = reference
    by_length = np.argsort(cells.n_tokens(), kind="stable")
    rows = by_length[np.linspace(0, len(cells) - 1, POOL_SIZE).astype(int)]
    single = PredictConfig(MODEL_KEYS, batch_size=1)
    return rows, [predict_positions(model.model, subset(cells, [row]), single, CPU) for row in rows]


@given(data=st.data())
@examples(10)
def test_batch_mates_change_no_model_output(reference, pool, data):
    model, cells = reference
    rows, alone = pool
    picks = data.draw(st.lists(st.integers(0, POOL_SIZE - 1), min_size=2, max_size=5, unique=True))
    budget = data.draw(st.one_of(st.none(), st.integers(1, 5 * cells.seq_len)), label="max_tokens")
    predict_config = PredictConfig(MODEL_KEYS, batch_size=data.draw(st.integers(1, 5)), max_tokens=budget)
    together = predict_positions(model.model, subset(cells, rows[picks]), predict_config, CPU)
    for i, pick in enumerate(picks):
        single = alone[pick]
        for key, value in single.items():
            finite = np.isfinite(value[0])
            np.testing.assert_array_equal(np.isfinite(together[key][i]), finite, err_msg=key)
            scale = max(1.0, float(np.abs(value[0][finite]).max(initial=0)))
            # Alone, a cell's batch ends one position past its genes: positions beyond hold 0, as they must here.
            np.testing.assert_allclose(together[key][i], value[0], rtol=1e-5, atol=1e-6 * scale, err_msg=key)
