"""Bad and extreme settings of ``generate``.

Range checks, the sampling loop's check for non-finite values, and property tests over the numeric and gene-list
parameters of ``TranscriptFormerModel.generate``.
"""

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import transcriptformer
from conftest import REFERENCE_DIR, assert_no_output
from test_generate import DEMO_MODEL, sequences
from test_properties import examples
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.config import MAX_GENERATED_CELLS, SamplingConfig
from transcriptformer.errors import UserError
from transcriptformer.model.sampling import filtered_probabilities

TARGETS = ["--num-cells", "2", "--num-genes", "5", "--library-size", "20"]


@pytest.fixture(scope="module")
def demo() -> transcriptformer.TranscriptFormerModel:
    return transcriptformer.load(DEMO_MODEL, device="cpu")


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--temperature", "inf", ["temperature", "finite", "inf"]),
        ("--temperature", "nan", ["temperature", "finite"]),
        ("--temperature", "-1", ["temperature", "> 0"]),
        ("--top-p", "nan", ["--top-p", "finite"]),
        ("--top-p", "1.5", ["--top-p", "<= 1"]),
        ("--top-k", "-1", ["--top-k", ">= 0"]),
        ("--top-k", "99999999999999999999", ["--top-k", "<= 1000000"]),
        ("--seed", "-1", ["seed", ">= 0"]),
        ("--seed", "99999999999999999999999", ["seed", "64-bit"]),
        ("--num-cells", "100000000000", ["--num-cells", f"<= {MAX_GENERATED_CELLS}", "another seed"]),
        ("--num-genes", "99999999999999999999", ["--num-genes", "<= 1000000"]),
        ("--library-size", "inf", ["--library-size", "finite"]),
        ("--library-size", "-3", ["--library-size", "> 0"]),
        ("--prompt-genes", "-1", ["--prompt-genes", ">= 0"]),
    ],
)
def test_out_of_range_settings_are_one_line_errors(tmp_path, capsys, flag, value, words):
    """Each numeric setting is checked before the model is loaded: one line naming it, no output."""
    out = tmp_path / "out"
    args = ["--checkpoint-path", DEMO_MODEL, "--output-path", out, *TARGETS, flag, value]
    code, err = run_cli(capsys, "generate", *args)
    assert_one_line_error(code, err, "generate", *words)
    assert_no_output(out)


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"top_k": "3"}, ["top_k", "integer"]),
        ({"num_cells": 2.5}, ["num_cells", "integer"]),
        ({"use_cache": 1}, ["use_cache", "true or false"]),
        ({"temperature": float("inf")}, ["temperature", "finite"]),
    ],
)
def test_api_settings_of_the_wrong_type_or_range_name_the_keyword(setting, words):
    with pytest.raises(ValueError) as error:
        SamplingConfig(**setting)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_numpy_integers_are_accepted_as_settings():
    assert SamplingConfig(num_cells=np.int64(3), seed=np.uint32(7)).num_cells == 3


def test_a_temperature_near_zero_takes_the_most_likely_gene_and_a_huge_one_every_gene_alike():
    logits = torch.tensor([[1.0, 3.0, 2.0, -torch.inf], [0.5, 0.25, 0.75, 0.0]])
    cold = filtered_probabilities(logits, 1e-300, 0, 1.0)
    assert cold.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    hot = filtered_probabilities(logits, 1e300, 0, 1.0)
    np.testing.assert_allclose(hot.numpy(), [[1 / 3, 1 / 3, 1 / 3, 0.0], [0.25] * 4])
    assert filtered_probabilities(logits, 1.0, 10**6, 1.0).sum(-1).tolist() == [1.0, 1.0]  # top_k > vocabulary


def test_near_zero_temperature_generates_the_greedy_cell(demo):
    """The greedy cell (top_k=1) and the cell at temperature 1e-320 are the same; before, the logits overflowed."""
    greedy = demo.generate(num_cells=1, num_genes=6, library_size=12, top_k=1, aux={"assay": "MERFISH"})
    cold = demo.generate(num_cells=1, num_genes=6, library_size=12, temperature=1e-320, aux={"assay": "MERFISH"})
    assert [gene for gene, _ in sequences(cold)[0]] == [gene for gene, _ in sequences(greedy)[0]]


def test_a_model_whose_logits_overflow_stops_the_sampling_loop():
    """Gene-id logits that overflow to infinity (a diverged model) stop generation with one line, no output.

    The weights of the first gene-id layer are scaled up in memory (the checkpoint loader refuses non-finite
    weights, but finite weights can still overflow; the layer norm after it turns infinity into NaN): without the
    check, NaN probabilities drew the last vocabulary gene at every step.
    """
    model = transcriptformer.load(REFERENCE_DIR, device="cpu")
    with torch.no_grad():
        model.model.gene_id_head.layers[0].weight.mul_(1e38)
    with pytest.raises(UserError, match=r"gene-id logits are NaN or infinite for 2 of 2 cells at gene 1"):
        model.generate(num_cells=2, num_genes=4, library_size=10)


def mostly(valid: st.SearchStrategy, *invalid) -> st.SearchStrategy:
    """Valid values four times in five, else one of ``invalid``."""
    return st.one_of(valid, valid, valid, valid, st.sampled_from(invalid))


NOT_FINITE = (float("nan"), float("inf"), -float("inf"))
VALID = dict(num_cells=2, num_genes=3, max_genes=4, library_size=10.0, temperature=1.0, top_k=0, top_p=1.0, seed=0)
VALID |= dict(genes=["Crym"])


@given(
    num_cells=mostly(st.integers(1, 3), 0, -2, MAX_GENERATED_CELLS + 1),
    num_genes=mostly(st.one_of(st.none(), st.integers(1, 6)), 0, -1, 10**30),
    max_genes=mostly(st.integers(1, 8), 0, 10**6),  # None would generate seq_len genes: too slow here
    library_size=mostly(st.floats(1e-6, 1e300), 0.0, -1.0, *NOT_FINITE),
    temperature=mostly(st.floats(1e-300, 1e300), 0.0, -1.0, *NOT_FINITE),
    top_k=mostly(st.integers(0, 2000), -1, 10**30),
    top_p=mostly(st.floats(1e-320, 1.0), 0.0, 1.5, *NOT_FINITE),
    seed=mostly(st.integers(0, 2**63 - 1), -1, 2**64),
    genes=st.lists(st.sampled_from(["Crym", "Vgf", "Gad2", "ENSMUSG00000000001", "NotAGene", ""]), max_size=3),
)
@example(**(VALID | {"temperature": math.inf}))  # NaN probabilities drew the last gene at every step
@example(**(VALID | {"temperature": 1e-320}))  # the logits overflowed
@example(**(VALID | {"seed": 2**64}))  # h5py failed at write
@example(**(VALID | {"top_k": 10**30}))  # h5py failed at write
@examples(40)
def test_generate_returns_finite_cells_or_a_clear_error(
    demo, num_cells, num_genes, max_genes, library_size, temperature, top_k, top_p, seed, genes
):
    settings = dict(num_cells=num_cells, num_genes=num_genes, max_genes=max_genes, library_size=library_size)
    settings |= dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, batch_size=2)
    try:
        adata = demo.generate(genes=genes, aux={"assay": "MERFISH"}, **settings)
    except (UserError, ValueError, KeyError) as error:
        message = str(error.args[0] if isinstance(error, KeyError) else error)
        assert message and "\n" not in message and len(message) < 600, message
        assert any(word in message for word in (*settings, "genes", "--genes", "--max-genes", "--num-cells")), message
        return
    # Only settings in their documented ranges generate, and what they generate is finite and can be written.
    assert 0 < temperature < math.inf and 0 < top_p <= 1 and 0 < library_size < math.inf and 0 <= seed < 2**63
    counts = adata.X.toarray()
    assert adata.n_obs == num_cells and np.isfinite(counts).all()
    assert (counts >= 1).sum() == adata.obs["num_genes"].sum()
    assert (counts == np.round(counts)).all() and np.isfinite(adata.obs["target_library_size"]).all()
    assert (adata.obs["num_genes"] <= max_genes).all()
    with tempfile.TemporaryDirectory() as folder:
        adata.write_h5ad(Path(folder) / "generated.h5ad")
