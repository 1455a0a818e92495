"""The engine runs any task of its protocol: here one whose rows are not the input cells (as perturbation's are).

The task below is written for this test: each cell gives two rows, its outputs twice, with obs of their own and a
string per row that no model output declares.
"""

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from transcriptformer.engine import RunConfig, run_in_memory, run_task
from transcriptformer.engine.session import load_for_run
from transcriptformer.engine.task import BatchLoopTask, Part
from transcriptformer.pipeline import GeneOutputs

COPIES = ("a", "b")


@dataclass
class TwoRowsTask(BatchLoopTask):
    """Each unit's cells as rows ``<cell>/a`` (all of them), then ``<cell>/b``."""

    name: str = "two-rows"
    rows_are_cells: bool = False

    def run_unit(self, session, unit, cells, on_batch, limit) -> Part:
        outputs = super().run_unit(session, unit, cells, on_batch, limit).outputs
        names = session.files[unit.file_index].obs.index[unit.start : unit.stop]
        doubled = GeneOutputs.concat([outputs, outputs])
        copies = np.repeat(COPIES, len(names)).astype(object)
        doubled.cell_values["copy_label"] = np.array([f"copy {c}" for c in copies], dtype=object)
        cell_names = np.tile(names, 2)
        index = [f"{n}/{c}" for c, n in zip(copies, cell_names, strict=True)]
        obs = pd.DataFrame({"cell": cell_names, "copy": copies}, index=index)
        return Part(doubled, obs)

    def finish(self, obs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
        return obs.assign(llh_rank=obs["llh"].rank().to_numpy()), {"rows": len(obs)}


def config(reference_dir, reference_input, tmp_path, **settings) -> RunConfig:
    return RunConfig.from_checkpoint(
        reference_dir,
        data_files=[str(reference_input)],
        output_path=str(tmp_path),
        output_keys=["embeddings", "llh"],
        **settings,
    )


def expected_rows(names: pd.Index, chunk_size: int) -> list[str]:
    rows = []
    for start in range(0, len(names), chunk_size):
        rows += [f"{n}/{c}" for c in COPIES for n in names[start : start + chunk_size]]
    return rows


def test_rows_of_their_own_are_written_from_files_and_in_memory(reference_dir, reference_input, expected, tmp_path):
    path = run_task(TwoRowsTask(), config(reference_dir, reference_input, tmp_path, chunk_size=24, batch_size=16))
    written = ad.read_h5ad(path)
    names = ad.read_h5ad(reference_input).obs_names
    assert list(written.obs_names) == expected_rows(names, 24) and written.n_obs == 2 * len(names)
    cell = names.get_indexer(written.obs["cell"])
    np.testing.assert_allclose(written.obsm["X_transcriptformer"], expected["embeddings"][cell], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(written.obs["llh"], expected["llh"][cell], rtol=1e-4)
    assert (written.obs["copy_label"] == "copy " + written.obs["copy"].astype(str)).all()
    assert written.uns["rows"] == 128 and "llh_rank" in written.obs
    assert not list(tmp_path.glob(".*.parts"))

    checkpoint_config = config(reference_dir, reference_input, tmp_path, chunk_size=24, batch_size=16)

    checkpoint = load_for_run(checkpoint_config, torch.device("cpu"))
    result = run_in_memory(TwoRowsTask(), checkpoint, reference_input, checkpoint_config, torch.device("cpu"))
    pd.testing.assert_frame_equal(
        result.obs, written.obs.drop(columns="source_file", errors="ignore"), check_dtype=False, check_categorical=False
    )
    np.testing.assert_array_equal(result.outputs.cell_values["embeddings"], written.obsm["X_transcriptformer"])


def test_a_task_whose_rows_are_not_the_cells_cannot_write_a_soma_array(reference_dir, reference_input, tmp_path):
    settings = config(reference_dir, reference_input, tmp_path)
    settings.output.output_soma, settings.input.soma = str(tmp_path / "array"), "experiment"
    settings.input.data_files = []
    with pytest.raises(ValueError, match="output_soma holds a row per input cell"):
        run_task(TwoRowsTask(), settings)
