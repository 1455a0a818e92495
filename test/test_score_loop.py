"""The compiled score loop of attention on the CPU: its package in the cache folder, parity, reuse and fallbacks."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from transcriptformer.model.attention import CachedScoreLoop, probabilities

NEVER = 1 << 62  # score elements: a loop that never builds its package


def score_inputs(
    batch: int, heads: int, rows: int, keys: int, seed: int, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, ...]:
    """Products, count bias, padding (the first keys of cell 0) and the rows that see no key.

    Bias and padding are the first ``keys`` columns of longer ones, as a row block's are (not contiguous).
    """
    gen = torch.Generator().manual_seed(seed)
    scores = (4 * torch.randn(batch, heads, rows, keys, generator=gen)).to(dtype)
    count_bias = torch.log1p(torch.rand(batch, keys + 9, generator=gen) * 20)[:, :keys]
    kv_is_pad = (torch.rand(batch, keys + 9, generator=gen) < 0.2)[:, :keys]
    kv_is_pad[0, :3] = True
    visible = ~kv_is_pad
    first_visible = torch.where(visible.any(1), visible.int().argmax(1), keys)
    sees_nothing = torch.arange(keys - rows, keys)[:, None] < first_visible[:, None, None, None]  # (B, 1, R, 1)
    return scores, count_bias, kv_is_pad, sees_nothing if sees_nothing.any() else None


def eager(scores, count_bias, kv_is_pad, sees_nothing, cap=10.0, embed_mode=False):
    start = scores.shape[-1] - scores.shape[-2]
    return probabilities(scores.clone(), count_bias, kv_is_pad, start, cap, embed_mode, sees_nothing, scores.dtype)


SHAPES = [(3, 2, 40, 40), (2, 4, 7, 130), (1, 2, 1, 5), (4, 3, 64, 64)]  # whole sequences, row blocks, one row


@pytest.mark.slow  # compiles the package: 20-50 s on two busy cores
@pytest.mark.parametrize("embed_mode, dtype", [(False, torch.bfloat16), (True, torch.bfloat16)])
def test_compiled_score_loop_matches_eager_and_a_second_process_loads_it(tmp_path, embed_mode, dtype):
    loop = CachedScoreLoop(10.0, embed_mode, dtype, dtype, cache_dir=tmp_path, build_after=0)
    assert loop.loop is None and not loop.path.exists()
    outputs = []
    for seed, shape in enumerate(SHAPES):
        inputs = score_inputs(*shape, seed=seed, dtype=dtype)
        got = loop(inputs[0].clone(), *inputs[1:])
        expected = eager(*inputs, embed_mode=embed_mode)
        assert got.dtype == dtype and got.shape == expected.shape
        # bf16: the rounding of the same float32 values; float32: summation order (parity tests allow 1e-4)
        torch.testing.assert_close(got, expected, **({} if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)))
        if inputs[3] is not None:
            assert torch.equal(got[0, :, :3], torch.zeros_like(got[0, :, :3]))  # rows that see nothing: zeros
        assert torch.isfinite(got).all()
        outputs.append(got)
    assert loop.loop is not None and loop.path.is_file()
    assert [p.name for p in loop.path.parent.iterdir()] == [loop.path.name]  # no partial file left behind

    again = CachedScoreLoop(10.0, embed_mode, dtype, dtype, cache_dir=tmp_path, build_after=NEVER)
    assert again.loop is not None  # loaded from the cache folder, nothing compiled
    for seed, (shape, first) in enumerate(zip(SHAPES, outputs, strict=True)):
        inputs = score_inputs(*shape, seed=seed, dtype=dtype)
        assert torch.equal(again(inputs[0].clone(), *inputs[1:]), first)
    other = CachedScoreLoop(5.0, embed_mode, dtype, dtype, cache_dir=tmp_path, build_after=NEVER)
    assert other.path != loop.path and other.loop is None  # another softcap: another package


def test_short_runs_stay_eager_and_build_nothing(tmp_path):
    inputs = score_inputs(2, 2, 30, 50, seed=1)
    loop = CachedScoreLoop(10.0, False, torch.bfloat16, torch.bfloat16, cache_dir=tmp_path, build_after=NEVER)
    assert torch.equal(loop(inputs[0].clone(), *inputs[1:]), eager(*inputs))
    assert loop.loop is None and loop.eager_elements == inputs[0].numel() and not tmp_path.joinpath("compiled").exists()


def test_corrupt_package_warns_once_and_runs_eagerly(tmp_path):
    settings = (10.0, False, torch.bfloat16, torch.bfloat16)
    path = CachedScoreLoop(*settings, cache_dir=tmp_path, build_after=NEVER).path
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 not a package")
    with pytest.warns(UserWarning, match="cannot be loaded .*running uncompiled, slower"):
        loop = CachedScoreLoop(*settings, cache_dir=tmp_path, build_after=NEVER)
    assert loop.loop is None
    inputs = score_inputs(3, 2, 40, 40, seed=2)
    assert torch.equal(loop(inputs[0].clone(), *inputs[1:]), eager(*inputs))


def test_without_a_cxx_compiler_the_build_fails_with_a_warning_and_runs_eagerly(tmp_path):
    script = f"""
        import warnings
        import torch
        from test_score_loop import eager, score_inputs
        from transcriptformer.model.attention import CachedScoreLoop

        loop = CachedScoreLoop(10.0, False, torch.bfloat16, torch.bfloat16, cache_dir={str(tmp_path)!r}, build_after=0)
        inputs = score_inputs(3, 2, 40, 40, seed=3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = (loop(inputs[0].clone(), *inputs[1:]) for _ in range(2))
        assert torch.equal(first, eager(*inputs)) and torch.equal(second, first)
        assert loop.loop is None and loop.build_failed and not loop.path.exists()
        print([str(w.message) for w in caught])
    """
    result = run_with_test_modules(script, {"CXX": str(tmp_path / "no-such-compiler")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("could not be compiled") == 1 and "running uncompiled, slower" in result.stdout
    assert list(tmp_path.joinpath("compiled").iterdir()) == []  # the partial file removed


def run_with_test_modules(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``script`` in a fresh process that imports this folder's modules."""
    env = {
        **os.environ,
        **env,
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True)


def test_float32_outputs_never_read_a_package(tmp_path):
    """float32 runs the eager steps even where the cache folder holds float32 packages: results never depend on it."""
    script = """
        import warnings
        import numpy as np
        import torch
        import transcriptformer
        from conftest import REFERENCE_DIR, REFERENCE_INPUT
        from test_parity import OUTPUTS, assert_matches_reference
        from test_score_loop import NEVER
        from transcriptformer.model.attention import CachedScoreLoop

        model = transcriptformer.load(REFERENCE_DIR, device="cpu")
        cap = model.model.model_config.softcap
        for embed_mode in (True, False):  # a package read would warn that it cannot be loaded
            CachedScoreLoop(cap, embed_mode, torch.float32, torch.float32, build_after=NEVER).path.write_bytes(b"x")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = model.predict(REFERENCE_INPUT, batch_size=16, output_keys=OUTPUTS)
        with np.load(REFERENCE_DIR / "expected.npz") as expected:
            assert_matches_reference(result, dict(expected))
    """
    (tmp_path / "compiled").mkdir()
    result = run_with_test_modules(script, {"TRANSCRIPTFORMER_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.joinpath("compiled").glob("attention_scores-*.pt2"))) == 2
