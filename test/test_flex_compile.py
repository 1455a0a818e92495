"""Compiled FlexAttention over training batches of many lengths: a bounded number of compilations.

GPU pretraining compiles the attention once per shape the compiler treats as new. The CPU has no FlexAttention
backward, so the training-mode forward pass runs without gradients here, and the ``eager`` backend of
``torch.compile`` traces and guards as on a GPU without generating code.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_sapiens import attention_compilations, training_batches  # noqa: E402


@pytest.mark.slow
def test_training_batches_of_many_lengths_compile_the_attention_at_most_three_times():
    model, batches = training_batches(12)
    compilations, shapes = attention_compilations(model, batches, "eager")
    lengths = {length for _, length in shapes}
    assert len(lengths) >= 10  # trimmed to the longest cell: a new length nearly every batch
    assert min(lengths) <= 128 < max(lengths)  # batches of one block and of several
    # The first shape, the length made dynamic, and batches of one block (a size of 1 is always specialized).
    assert compilations <= 3
