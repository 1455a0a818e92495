"""Out of device memory: the batch loop lowers the batch size or token budget and goes on, or stops in one line.

The loop halves the batch size (or token budget), warns once per lowering, runs the failed batch again and
continues; a single cell that does not fit is a one-line error.

Running out of GPU memory cannot happen on the CPU that the tests run on, and the model must not be faked. So
:class:`SmallDevice` wraps the real reference model and raises torch's real ``OutOfMemoryError`` (the class that
CUDA raises: ``torch.cuda.OutOfMemoryError`` is ``torch.OutOfMemoryError``) for a forward pass of more tokens than
it holds, as a device of that size would; every batch that fits is computed by the real model. Outputs do not
depend on the batch shape beyond float32 rounding (see test_determinism.py), so a run that lowered its batches agrees
with a normal run to that rounding, and exactly in which positions hold values.
"""

import warnings
from collections.abc import Collection

import numpy as np
import pytest
import torch
from torch import Tensor

from conftest import PARITY_OUTPUTS
from transcriptformer.cli import build_parser, subcommand_parser
from transcriptformer.cli.common import report_user_error
from transcriptformer.config import PredictConfig
from transcriptformer.engine.config import RunConfig
from transcriptformer.engine.distributed import Rank
from transcriptformer.engine.parts import load_part, open_parts_dir, part_file, parts_dir
from transcriptformer.engine.run import process_units
from transcriptformer.engine.session import prepare
from transcriptformer.errors import UserError
from transcriptformer.pipeline import Predictor, plan, predict_positions
from transcriptformer.tasks.embed import EmbedTask

CPU = torch.device("cpu")
KEYS = (*PARITY_OUTPUTS, "cge")


class SmallDevice:
    """A real model on a device that holds forward passes of at most ``capacity`` tokens (cells x positions).

    ``tried`` records the ``(cells, positions, out_of_memory)`` of every forward pass, in order.
    """

    def __init__(self, model: Predictor, capacity: int):
        self.model = model
        self.capacity = capacity
        self.special_tokens = model.special_tokens
        self.seq_len = model.seq_len
        self.output_keys = model.output_keys
        self.tried: list[tuple[int, int, bool]] = []

    def length_multiple(self, device: torch.device) -> int:
        return self.model.length_multiple(device)

    def predict(
        self,
        gene_tokens: Tensor,
        gene_counts: Tensor,
        aux_tokens: Tensor | None,
        output_keys: Collection[str],
        embedding_layer_index: int = -1,
    ) -> dict[str, Tensor]:
        cells, positions = gene_tokens.shape
        out_of_memory = cells * positions > self.capacity
        self.tried.append((cells, positions, out_of_memory))
        if out_of_memory:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {cells} x {positions}")
        return self.model.predict(gene_tokens, gene_counts, aux_tokens, output_keys, embedding_layer_index)

    def failures(self) -> list[tuple[int, int]]:
        return [(cells, positions) for cells, positions, out_of_memory in self.tried if out_of_memory]

    def cells_computed(self) -> int:
        return sum(cells for cells, _, out_of_memory in self.tried if not out_of_memory)


@pytest.fixture(scope="module")
def cells(reference_model, reference_input):
    return reference_model.tokenize(reference_input)


@pytest.fixture(scope="module")
def seq_len(reference_model) -> int:
    return reference_model.model.seq_len


@pytest.fixture(scope="module")
def normal_run(reference_model, cells):
    """Every output of the reference cells, 16 cells a batch, on a device large enough."""
    return predict_positions(reference_model.model, cells, PredictConfig(KEYS, batch_size=16), CPU)


def run_on(device: SmallDevice, cells, settings: PredictConfig) -> tuple[dict[str, np.ndarray], list[str]]:
    """The outputs and the warnings of a run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = predict_positions(device, cells, settings, CPU)
    return outputs, [str(w.message) for w in caught]


def assert_same_outputs(actual: dict[str, np.ndarray], desired: dict[str, np.ndarray]) -> None:
    assert actual.keys() == desired.keys()
    for key in ("gene_token_indices", "gene_counts", "aux_token_indices"):
        np.testing.assert_array_equal(actual[key], desired[key], err_msg=key)
    for key in KEYS:
        finite = np.isfinite(desired[key])
        np.testing.assert_array_equal(np.isfinite(actual[key]), finite, err_msg=key)
        scale = np.abs(desired[key][finite]).max()
        np.testing.assert_allclose(actual[key], desired[key], rtol=1e-5, atol=1e-6 * scale, err_msg=key)


def test_out_of_memory_halves_the_batch_size_and_changes_no_result(reference_model, cells, seq_len, normal_run):
    first = plan(reference_model.model, cells, PredictConfig(batch_size=16), CPU)[0]
    assert (len(first.rows), first.length) == (16, seq_len)  # the premise: the longest cells come first
    device = SmallDevice(reference_model.model, capacity=8 * seq_len - 1)  # 16 and 8 full-length cells do not fit

    outputs, messages = run_on(device, cells, PredictConfig(KEYS, batch_size=16))

    assert_same_outputs(outputs, normal_run)
    assert device.failures() == [(16, seq_len), (8, seq_len)]
    assert device.tried[:2] == [(16, seq_len, True), (8, seq_len, True)]  # the failed batch is the one run again
    assert all(cells_in_batch <= 4 for cells_in_batch, _, _ in device.tried[2:])
    assert device.cells_computed() == len(cells)  # every cell once
    assert len(messages) == 2  # one warning per lowering
    assert f"out of memory in a batch of 16 cells x {seq_len} positions" in messages[0]
    assert "continuing with `batch_size=8`" in messages[0]
    assert "continuing with `batch_size=4`" in messages[1]


def test_out_of_memory_halves_the_token_budget_and_changes_no_result(reference_model, cells, seq_len, normal_run):
    device = SmallDevice(reference_model.model, capacity=8 * seq_len - 1)

    outputs, messages = run_on(device, cells, PredictConfig(KEYS, max_tokens=16 * seq_len))

    assert_same_outputs(outputs, normal_run)
    assert device.failures() == [(16, seq_len), (8, seq_len)]
    assert all(n * length <= 4 * seq_len for n, length, _ in device.tried[2:])
    assert device.cells_computed() == len(cells)
    assert len(messages) == 2
    assert f"continuing with `max_tokens={8 * seq_len}`" in messages[0]
    assert f"continuing with `max_tokens={4 * seq_len}`" in messages[1]


def test_a_single_cell_that_does_not_fit_is_a_one_line_error(reference_model, cells, seq_len, capsys):
    device = SmallDevice(reference_model.model, capacity=seq_len - 1)  # not even one full-length cell fits

    with pytest.raises(UserError) as raised, warnings.catch_warnings(record=True):
        predict_positions(device, cells, PredictConfig(KEYS, batch_size=16), CPU)

    assert [n for n, _ in device.failures()] == [16, 8, 4, 2, 1]  # halved down to one cell before giving up
    assert device.cells_computed() == 0
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)
    assert "`device=cpu`" in str(raised.value)  # the library names the parameter
    inference = subcommand_parser(build_parser(["inference"]), "inference")
    assert report_user_error("inference", raised.value, inference) == 1  # how the command line reports it
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"error: out of memory on cpu with a single cell of {seq_len} positions" in err
    assert "--device cpu" in err and "`" not in err


def inference_session(reference_dir, reference_input, output, chunk_size):
    """A session of `transcriptformer inference` over the reference cells, embeddings only, 16 cells a batch."""
    settings = {"data_files": [str(reference_input)], "output_path": str(output), "batch_size": 16}
    return prepare(RunConfig.from_checkpoint(reference_dir, chunk_size=chunk_size, **settings), CPU, EmbedTask())


def test_a_run_keeps_the_lowered_batch_size_for_its_later_units(reference_dir, reference_input, normal_run, tmp_path):
    chunk_size = 16
    with inference_session(reference_dir, reference_input, tmp_path, chunk_size) as session:
        seq_len = session.model.seq_len
        first_batches = [
            plan(session.model, session.read_unit(u), session.config.predict, CPU)[0] for u in session.units
        ]
        # The premise: every unit's first batch holds several full-length cells, which would not fit.
        assert all(len(batch.rows) >= 2 and batch.length == seq_len for batch in first_batches)
        session.model = device = SmallDevice(session.model, capacity=seq_len)  # any one cell fits
        open_parts_dir(session)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            process_units(session, session.units, Rank())

        assert len(session.units) == 4
        assert len(device.failures()) == 1  # in the first unit only: the later ones start at the lowered size
        assert device.cells_computed() == 64
        lowered = len(first_batches[0].rows) // 2
        assert all(n <= lowered for n, _, _ in device.tried[1:])
        messages = [str(w.message) for w in caught if "out of memory" in str(w.message)]
        assert len(messages) == 1 and f"continuing with `batch_size={lowered}`" in messages[0]
        for unit in session.units:
            saved = load_part(part_file(session, unit)).outputs.cell_values["embeddings"]
            desired = normal_run["embeddings"][unit.start : unit.stop]
            np.testing.assert_allclose(saved, desired, rtol=1e-5, atol=1e-6 * np.abs(desired).max())


def test_a_run_stops_without_output_when_a_single_cell_does_not_fit(reference_dir, reference_input, tmp_path):
    with inference_session(reference_dir, reference_input, tmp_path, chunk_size=16) as session:
        session.model = SmallDevice(session.model, capacity=1)
        open_parts_dir(session)
        with pytest.raises(UserError, match="single cell"), warnings.catch_warnings(record=True):
            process_units(session, session.units, Rank())

        assert not session.output_file.exists()
        assert not any(part_file(session, unit).exists() for unit in session.units)
        assert not list(parts_dir(session).glob(".*.tmp"))
