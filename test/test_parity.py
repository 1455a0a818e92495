"""Parity with the original implementation on the reference checkpoint (SPEC section 8)."""

import numpy as np
import pytest

import transcriptformer

OUTPUTS = ("embeddings", "llh", "gene_llh", "mu")


def assert_matches_reference(result, expected, rtol=1e-4):
    for key in OUTPUTS:
        got, want = result[key], expected[key]
        assert got.shape == want.shape, key
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=key)


def test_preprocessing_equals_reference_exactly(reference_model, reference_input, expected):
    result = reference_model.predict(reference_input, batch_size=16, output_keys=("embeddings",))
    for key in ("gene_token_indices", "gene_counts", "aux_token_indices"):
        assert result[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(result[key], expected[key], err_msg=key)


@pytest.mark.parametrize("backend", ["chunked", "flex"])
def test_outputs_match_reference(reference_dir, reference_input, expected, backend):
    model = transcriptformer.load(reference_dir, device="cpu", attention_backend=backend)
    result = model.predict(reference_input, batch_size=16, output_keys=OUTPUTS)
    assert_matches_reference(result, expected)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_outputs_do_not_depend_on_batch_size(reference_model, reference_input, expected, batch_size):
    result = reference_model.predict(reference_input, batch_size=batch_size, output_keys=OUTPUTS)
    assert_matches_reference(result, expected)


def test_contextual_gene_embeddings_are_consistent_with_cell_embedding(reference_model, reference_input, expected):
    result = reference_model.predict(reference_input, batch_size=16, output_keys=("embeddings", "cge"))
    cge = result["cge"]
    assert cge.shape == (64, 127, 64)
    # The cell embedding is the sum of the unpadded positions' outputs (shifted-input mask) over seq_len.
    shifted_pad = np.concatenate([np.zeros((64, 1), bool), expected["gene_token_indices"][:, :-1] == 1], axis=1)
    recomputed = np.where(shifted_pad[..., None], 0, cge).sum(1) / 127
    np.testing.assert_allclose(recomputed, expected["embeddings"], rtol=1e-4, atol=1e-6)


def test_mu_sums_to_total_count_and_is_zero_at_padding(reference_model, reference_input, expected):
    result = reference_model.predict(reference_input, batch_size=16, output_keys=("mu",))
    np.testing.assert_allclose(result["mu"].sum(1), expected["gene_counts"].sum(1), rtol=1e-5)
    assert np.all(result["mu"][expected["gene_token_indices"] == 1] == 0)


def test_bf16_mixed_on_cpu_embeddings_are_within_1e_2_of_float32(reference_model, reference_input, expected):
    result = reference_model.predict(reference_input, output_keys=("embeddings",), precision="bf16-mixed")
    got, want = result["embeddings"], expected["embeddings"]
    assert np.isfinite(got).all() and not np.array_equal(got, want)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
