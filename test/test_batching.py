"""Length-aware batching on real cells: every cell once, budgets kept, results unchanged."""

import anndata as ad
import numpy as np
import pytest

from conftest import PARITY_OUTPUTS
from transcriptformer.data.batching import batch_length, plan_batches


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


def test_batching_saves_padding(n_tokens):
    plan = plan_batches(n_tokens, 127, batch_size=8)
    padded_positions = sum(len(b.rows) * b.length for b in plan)
    assert padded_positions < 0.9 * len(n_tokens) * 127


def test_bad_plans_are_rejected(n_tokens):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        plan_batches(n_tokens, 127, batch_size=0)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        plan_batches(n_tokens, 127, max_tokens=0)


def test_token_budget_gives_reference_outputs(reference_model, reference_input, expected):
    result = reference_model.predict(reference_input, max_tokens=600, output_keys=PARITY_OUTPUTS)
    for key in PARITY_OUTPUTS:
        scale = np.abs(expected[key]).max()
        np.testing.assert_allclose(result[key], expected[key], rtol=1e-4, atol=1e-4 * scale, err_msg=key)
    np.testing.assert_array_equal(result["gene_token_indices"], expected["gene_token_indices"])
