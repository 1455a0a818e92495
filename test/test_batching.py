"""Length-aware batching on real cells: every cell once, budgets kept, results unchanged."""

import anndata as ad
import numpy as np
import pytest

from conftest import PARITY_OUTPUTS
from transcriptformer.data.batching import MAX_PADDING, batch_length, plan_batches


@pytest.fixture(scope="module")
def n_tokens(reference_model, reference_input):
    return reference_model.tokenize(ad.read_h5ad(reference_input)).n_tokens()


def test_token_counts_of_real_cells(n_tokens, expected):
    np.testing.assert_array_equal(n_tokens, (expected["gene_token_indices"] != 1).sum(1))


def test_batch_length_keeps_one_position_past_the_longest_cell():
    assert batch_length(10, seq_len=127) == 11
    assert batch_length(126, seq_len=127) == 127
    assert batch_length(127, seq_len=127) == 127
    assert batch_length(10, seq_len=2047, multiple=128) == 128
    assert batch_length(2000, seq_len=2047, multiple=128) == 2047
    assert batch_length(0, seq_len=127) == 1


@pytest.mark.parametrize(("batch_size", "max_tokens", "window"), [(8, None, 4096), (5, None, 16), (None, 700, 30)])
def test_plan_covers_every_cell_once(n_tokens, batch_size, max_tokens, window):
    plan = plan_batches(n_tokens, 127, batch_size=batch_size, max_tokens=max_tokens, window=window)
    rows = np.concatenate([b.rows for b in plan])
    assert sorted(rows.tolist()) == list(range(len(n_tokens)))
    for batch in plan:
        assert batch.length == batch_length(int(n_tokens[batch.rows].max()), 127)
        if max_tokens is None:
            assert len(batch.rows) <= batch_size
        else:
            assert len(batch.rows) * batch.length <= max_tokens or len(batch.rows) == 1
        # sorting stays within a window
        assert len({int(r) // window for r in batch.rows}) == 1
        assert padding_share(batch, n_tokens) <= MAX_PADDING


def padding_share(batch, n_tokens, seq_len=127, multiple=1):
    """Share of the batch's positions that pad its cells beyond the length each would have in a batch alone."""
    alone = [batch_length(int(n), seq_len, multiple) for n in n_tokens[batch.rows]]
    return 1 - sum(alone) / (len(alone) * batch.length)


@pytest.mark.parametrize("max_padding", [0.0, 0.05, 0.3])
def test_a_batch_ends_where_padding_would_exceed_its_share(n_tokens, max_padding):
    plan = plan_batches(n_tokens, 127, batch_size=16, max_padding=max_padding)
    for batch, following in zip(plan, plan[1:], strict=False):
        assert padding_share(batch, n_tokens) <= max_padding
        if len(batch.rows) < 16 and batch.length == following.length == 127:
            pytest.fail("cells of the same length were split")
        if len(batch.rows) < 16:  # the next cell would have padded the batch beyond the share
            grown = type(batch)(np.append(batch.rows, following.rows[0]), batch.length)
            assert padding_share(grown, n_tokens) > max_padding
    assert len(plan) > len(plan_batches(n_tokens, 127, batch_size=16, max_padding=1.0))


def test_padding_from_rounding_to_the_length_multiple_does_not_split_batches(n_tokens):
    short = n_tokens[n_tokens < 63]  # cells of 16 to 62 tokens, each alone in a batch of 64 positions
    assert len(np.unique(short)) > 10
    assert [(len(b.rows), b.length) for b in plan_batches(short, 127, batch_size=64, multiple=64)] == [(len(short), 64)]


def test_without_a_padding_limit_batches_are_full(n_tokens):
    plan = plan_batches(n_tokens, 127, batch_size=8, max_padding=1.0)
    assert [len(b.rows) for b in plan] == [8] * (len(n_tokens) // 8)


def test_batching_saves_padding(n_tokens):
    for max_padding in (1.0, MAX_PADDING):
        plan = plan_batches(n_tokens, 127, batch_size=8, max_padding=max_padding)
        padded_positions = sum(len(b.rows) * b.length for b in plan)
        assert padded_positions < 0.9 * len(n_tokens) * 127
    assert padded_positions <= np.minimum(n_tokens + 1, 127).sum() / (1 - MAX_PADDING)


def test_bad_plans_are_rejected(n_tokens):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        plan_batches(n_tokens, 127, batch_size=0)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        plan_batches(n_tokens, 127, max_tokens=0)
    with pytest.raises(ValueError, match=r"max_padding must be within \[0, 1\], got 1.5"):
        plan_batches(n_tokens, 127, max_padding=1.5)


def test_token_budget_gives_reference_outputs(reference_model, reference_input, expected):
    result = reference_model.predict(reference_input, max_tokens=600, output_keys=PARITY_OUTPUTS)
    for key in PARITY_OUTPUTS:
        scale = np.abs(expected[key]).max()
        np.testing.assert_allclose(result[key], expected[key], rtol=1e-4, atol=1e-4 * scale, err_msg=key)
    np.testing.assert_array_equal(result["gene_token_indices"], expected["gene_token_indices"])
