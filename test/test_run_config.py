"""A run's settings, one dataclass per concern: set by name, by former override keys, and what a resumed run compares.

An interrupted run is made for real: a session saves its first units as a killed run leaves them, then the whole
run starts again with ``resume=True``.
"""

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from transcriptformer.engine.config import RunConfig, apply_overrides
from transcriptformer.engine.distributed import Rank
from transcriptformer.engine.parts import open_parts_dir
from transcriptformer.engine.run import process_units, run_task
from transcriptformer.engine.session import prepare
from transcriptformer.errors import UserError
from transcriptformer.tasks.embed import EmbedTask

CPU = torch.device("cpu")


def interrupted_run(config: RunConfig, units: int = 2) -> None:
    """The saved units and manifest that a run of ``config`` killed after ``units`` units leaves behind."""
    with prepare(config, CPU, EmbedTask()) as session:
        open_parts_dir(session)
        process_units(session, session.units[:units], Rank())


@pytest.fixture
def run(reference_dir, reference_input, tmp_path) -> RunConfig:
    return RunConfig.from_checkpoint(
        reference_dir,
        data_files=[str(reference_input)],
        output_path=str(tmp_path / "out"),
        output_keys=["embeddings", "llh"],
        chunk_size=16,
    )


def test_settings_are_set_by_name_into_their_node(run):
    changed = run.replace(batch_size=4, resume=True, n_data_workers=1, use_raw=False, adapter=None)
    assert (changed.predict.batch_size, changed.output.resume, changed.hardware.n_data_workers) == (4, True, 1)
    assert changed.input.use_raw is False and changed.predict.output_keys == ("embeddings", "llh")
    assert run.predict.batch_size == 8 and not run.output.resume  # a copy
    with pytest.raises(TypeError, match="no setting of a run is named batchsize"):
        run.replace(batchsize=4)
    with pytest.raises(ValueError, match="^chunk_size must be >= 1, got 0$"):
        run.replace(chunk_size=0)
    with pytest.raises(ValueError, match="output_soma: the array is indexed by the soma_joinid"):
        run.replace(output_soma="array")  # settings of two nodes that do not go together
    assert run.replace(emb_type="cge").predict.output_keys == ("embeddings", "llh", "cge")


def test_a_resumed_run_with_the_same_settings_resumes(run, capsys):
    whole = ad.read_h5ad(run_task(EmbedTask(), run.replace(output_path=run.output.output_path + "-whole")))
    interrupted_run(run)
    capsys.readouterr()
    # How a run is carried out may change (a former override key sets the same setting); what it computes may not.
    resumed = apply_overrides(run.replace(resume=True, overwrite=True), ["model.inference_config.n_data_workers=2"])
    again = ad.read_h5ad(run_task(EmbedTask(), resumed))
    assert "Resuming: 2 of 4 units were already done" in capsys.readouterr().out
    np.testing.assert_array_equal(again.obsm["embeddings"], whole.obsm["embeddings"])
    np.testing.assert_array_equal(again.obs["llh"], whole.obs["llh"])


@pytest.mark.parametrize(
    ("settings", "changed"),
    [
        ({"batch_size": 4}, "setting predict.batch_size"),
        ({"obs_keys": ["cell_type"]}, "setting output.obs_keys"),
        ({"remove_duplicate_genes": True}, "setting input.remove_duplicate_genes"),
    ],
)
def test_a_resumed_run_with_other_settings_names_them(run, settings, changed):
    interrupted_run(run, units=1)
    with pytest.raises(UserError, match=f"had other settings, inputs or weights.*changed: {changed}"):
        run_task(EmbedTask(), run.replace(resume=True, **settings))
    assert len(list((Path(run.output.output_path) / ".embeddings.h5ad.parts").glob("unit-*"))) == 1  # kept
