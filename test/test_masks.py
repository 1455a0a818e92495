"""Mask and score functions under create_block_mask/vmap, and every attention backend against a dense reference."""

import math

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import transcriptformer
from conftest import PARITY_OUTPUTS
from transcriptformer.model.attention import (
    AttentionInputs,
    BlockMaskCache,
    build_attention_inputs,
    chunked_attend,
    count_bias_score_mod,
    flex_attend,
    padding_block_mask,
    padding_mask_mod,
)


def dummy_inputs(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and a (B, N) pad mask: each row padded from a random point on, plus some scattered pads."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 30, (batch, length), generator=gen).float()
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    is_pad = torch.arange(length)[None, :] >= lengths[:, None]
    is_pad |= torch.rand(batch, length, generator=gen) < 0.1
    counts[is_pad] = 0
    return counts, is_pad


def dense_reference(q, k, v, counts, is_pad, eps, cap, embed_mode):
    """Expression-aware attention written out as one dense score matrix (SPEC section 5)."""
    n = q.shape[-2]
    q_idx = torch.arange(n)[:, None]
    kv_idx = torch.arange(n)[None, :]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    bias = torch.log1p(counts + eps)[:, None, None, :]
    scores = scores + bias * ((q_idx > kv_idx) | embed_mode)
    scores = cap * torch.tanh(torch.clamp(scores, -1e6, 1e6) / cap)
    allowed = (kv_idx <= q_idx) & ~is_pad[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a query that sees no key outputs zeros
    return probs @ v


@pytest.mark.parametrize(("batch", "length"), [(1, 1), (3, 127), (2, 128), (4, 200), (5, 2047)])
def test_create_block_mask_accepts_any_shape(batch, length):
    counts, is_pad = dummy_inputs(batch, length)
    block_mask = create_block_mask(padding_mask_mod(is_pad), batch, None, length, length, device="cpu")
    dense = block_mask.to_dense()  # (B, 1, q_blocks, kv_blocks)
    n_blocks = math.ceil(length / 128)
    assert dense.shape == (batch, 1, n_blocks, n_blocks)
    # Causal: no block above the diagonal is visited.
    assert not torch.triu(dense[:, 0].bool(), diagonal=1).any()


@pytest.mark.parametrize(
    ("batch", "length", "block_size"),
    [(1, 1, 128), (3, 127, 128), (2, 128, 128), (4, 200, 128), (3, 77, 16), (2, 9, 1)],
)
def test_padding_block_mask_is_the_block_mask_of_the_mask_function(batch, length, block_size):
    _, is_pad = dummy_inputs(batch, length)
    is_pad[0] = True  # a cell without any visible key
    expected = create_block_mask(padding_mask_mod(is_pad), batch, None, length, length, "cpu", block_size)
    got = padding_block_mask(is_pad, block_size)
    assert got.seq_lengths == expected.seq_lengths and got.BLOCK_SIZE == expected.BLOCK_SIZE
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    for name in ("full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_mask_mod_under_vmap_matches_dense_mask():
    batch, length = 3, 131  # not a multiple of the block size
    _, is_pad = dummy_inputs(batch, length)
    mask_mod = padding_mask_mod(is_pad)
    b = torch.arange(batch)[:, None, None]
    q_idx = torch.arange(length + 125)[None, :, None]  # indices beyond N, as create_block_mask's padding makes
    kv_idx = torch.arange(length + 125)[None, None, :]
    over_kv = torch.vmap(mask_mod, in_dims=(None, None, None, 0))
    vmapped = torch.vmap(torch.vmap(over_kv, in_dims=(None, None, 0, None)), in_dims=(0, None, None, None))
    got = vmapped(torch.arange(batch), torch.tensor(0), torch.arange(length + 125), torch.arange(length + 125))
    in_range = kv_idx < length
    padded = torch.nn.functional.pad(is_pad, (0, 125), value=True)
    expected = (kv_idx <= q_idx) & in_range & ~padded[b, kv_idx.clamp(max=length + 124)]
    assert torch.equal(got, expected)


def test_score_mod_under_vmap_matches_formula():
    batch, length, cap = 2, 70, 10.0
    counts, _ = dummy_inputs(batch, length)
    bias = torch.log1p(counts + 1e-6)
    for embed_mode in (True, False):
        score_mod = count_bias_score_mod(bias, cap, embed_mode)
        score = torch.randn(length, length) * 20
        vmapped = torch.vmap(torch.vmap(score_mod, in_dims=(0, None, None, None, 0)), in_dims=(0, None, None, 0, None))
        got = vmapped(score, torch.tensor(1), torch.tensor(0), torch.arange(length), torch.arange(length))
        applies = (torch.arange(length)[:, None] > torch.arange(length)[None, :]) | embed_mode
        expected = cap * torch.tanh((score + bias[1][None, :] * applies) / cap)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("embed_mode", [True, False])
@pytest.mark.parametrize(("batch", "length"), [(2, 64), (3, 131), (1, 300)])
def test_backends_match_dense_reference(batch, length, embed_mode):
    heads, head_dim, eps, cap = 4, 16, 1e-6, 10.0
    counts, is_pad = dummy_inputs(batch, length, seed=batch + length)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen) for _ in range(3))
    expected = dense_reference(q, k, v, counts, is_pad, eps, cap, embed_mode)

    for backend in ("flex", "chunked", "dense"):
        inputs = build_attention_inputs(
            counts, is_pad, eps=eps, cap=cap, embed_mode=embed_mode, backend=backend, block_size=128
        )
        got = flex_attend(q, k, v, inputs) if backend == "flex" else chunked_attend(q, k, v, inputs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"backend {backend}")


def test_chunked_attention_is_exact_for_any_block_of_rows():
    batch, heads, length, head_dim = 2, 2, 97, 8
    counts, is_pad = dummy_inputs(batch, length, seed=7)
    q, k, v = (torch.randn(batch, heads, length, head_dim) for _ in range(3))
    whole = chunked_attend(q, k, v, AttentionInputs(torch.log1p(counts + 1e-6), is_pad, 10.0, True, None, None))
    for rows in (1, 5, 32):
        inputs = AttentionInputs(torch.log1p(counts + 1e-6), is_pad, 10.0, True, None, batch * heads * length * rows)
        torch.testing.assert_close(chunked_attend(q, k, v, inputs), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "embed_mode", [pytest.param(True, marks=pytest.mark.slow), False]
)  # embed mode: 26 s on two busy cores
def test_bf16_chunked_attention_on_cpu_stays_close_to_float32(embed_mode):
    """bf16 products and the compiled score loop: finite, near the float32 reference, zeros where nothing is seen."""
    batch, heads, length, head_dim = 3, 2, 150, 16
    counts, is_pad = dummy_inputs(batch, length, seed=3)
    is_pad[1, :4] = True  # the first queries of cell 1 see no key
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen) for _ in range(3))
    expected = dense_reference(q, k, v, counts, is_pad, 1e-6, 10.0, embed_mode)
    inputs = build_attention_inputs(counts, is_pad, eps=1e-6, cap=10.0, embed_mode=embed_mode, backend="chunked")
    inputs.max_score_elements = batch * heads * length * 40  # several row blocks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), inputs)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert torch.equal(got[1, :, :4].float(), torch.zeros(heads, 4, head_dim))
    assert (got.float() - expected).norm() / expected.norm() < 1e-2


def test_query_without_visible_key_outputs_zeros():
    counts = torch.ones(1, 4)
    is_pad = torch.tensor([[True, False, False, False]])  # the first query can only see itself, a pad
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    for backend in ("flex", "chunked"):
        inputs = build_attention_inputs(counts, is_pad, eps=1e-6, cap=10.0, embed_mode=True, backend=backend)
        out = flex_attend(q, k, v, inputs) if backend == "flex" else chunked_attend(q, k, v, inputs)
        assert torch.equal(out[0, 0, 0], torch.zeros(8)), backend
        assert torch.isfinite(out).all(), backend


def test_block_masks_of_seen_padding_patterns_are_reused():
    cache = BlockMaskCache(max_entries=2)
    _, first = dummy_inputs(3, 200, seed=1)
    _, second = dummy_inputs(3, 200, seed=2)
    mask = cache.get(first, 128)
    assert cache.get(first.clone(), 128) is mask  # same pattern, another tensor: reused
    other = cache.get(second, 128)
    assert other is not mask and len(cache) == 2
    expected = create_block_mask(padding_mask_mod(second), 3, None, 200, 200, device="cpu")
    assert torch.equal(other.to_dense(), expected.to_dense())
    cache.get(torch.zeros(3, 200, dtype=torch.bool), 128)  # a third pattern evicts the least recently used
    assert len(cache) == 2 and cache.get(first, 128) is not mask


def test_forward_passes_share_cached_block_masks(reference_dir, reference_input, expected):
    model = transcriptformer.load(reference_dir, device="cpu", attention_backend="flex")
    cells = model.tokenize(reference_input)
    first = model.predict(cells, batch_size=16, output_keys=PARITY_OUTPUTS)
    masks_after_first = len(model.model.block_masks)
    second = model.predict(cells, batch_size=16, output_keys=PARITY_OUTPUTS)
    assert masks_after_first == 4 and len(model.model.block_masks) == 4  # 4 batches, their masks reused
    for key in PARITY_OUTPUTS:
        np.testing.assert_array_equal(second[key], first[key])
        np.testing.assert_allclose(second[key], expected[key], rtol=1e-4, atol=1e-4 * np.abs(expected[key]).max())
