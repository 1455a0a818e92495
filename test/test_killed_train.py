"""``train`` killed (SIGTERM) at several points: the previous checkpoint stays whole, or none loads.

The checkpoint folder is written as one unit (its ``config.json``, which makes it loadable, moved in last) while the
run holds the output's lock: a second run on the same output is refused. The command runs as a process (a signal is
under test).
"""

import signal
import time
from pathlib import Path

import pytest

from conftest import TRAIN_CONFIG, tiny_train_overrides
from test_killed_runs import SIGTERM_EXIT, start, terminate_when
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.cli import main
from transcriptformer.config import CONFIG_FILE, WEIGHTS_FILE
from transcriptformer.training.trainer import INTERRUPTED_DIR


def checkpoint_of(output: Path) -> dict[str, bytes] | None:
    """The files that make ``output`` a loadable checkpoint, or ``None`` where it does not load."""
    if not (output / CONFIG_FILE).exists():
        return None
    load_checkpoint(output)  # whole: config, weights and vocabularies fit together
    return {name: (output / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}


@pytest.mark.slow  # a training run to the end and three started: about a minute on two cores
def test_train_killed_at_any_point_keeps_the_previous_checkpoint_or_leaves_none_that_loads(tmp_path, capsys):
    output = tmp_path / "model"
    args = ["train", "--config", TRAIN_CONFIG, *tiny_train_overrides(output, "data.val_fraction=0")]
    started = time.monotonic()
    code = terminate_when(start(args, tmp_path / "loading.log"), lambda: time.monotonic() > started + 3)
    assert code in (-signal.SIGTERM, SIGTERM_EXIT)  # killed while starting and reading the cells
    assert checkpoint_of(output) is None

    assert main([*map(str, args), "trainer.max_steps=2", "--quiet"]) == 0
    previous = checkpoint_of(output)
    run_dir = tmp_path / "run"  # a run folder of its own: none of the previous run's checkpoints there
    log = tmp_path / "training.log"
    training = ["trainer.max_steps=100000", "trainer.max_epochs=1000", f"trainer.run_dir={run_dir}"]
    process = start([*args, *training, "trainer.checkpoint_every_n_steps=2", "--overwrite"], log)
    checkpoints = run_dir / "checkpoints"
    while process.poll() is None and not (checkpoints.is_dir() and any(checkpoints.glob("*.ckpt"))):
        time.sleep(0.01)
    assert process.poll() is None, log.read_text()
    code, err = run_cli(capsys, *args, "--overwrite")  # while it holds the output, a second run is refused
    assert_one_line_error(code, err, "train", "is being written by another run", "output_path")
    code = terminate_when(process, lambda: True)
    assert code == SIGTERM_EXIT, log.read_text()  # not 0: the run did not finish
    assert "training stopped by SIGTERMException" in log.read_text()
    assert checkpoint_of(output) == previous  # what it trained is in interrupted/, beside the previous checkpoint
    assert checkpoint_of(output / INTERRUPTED_DIR) is not None

    process = start([*args, "trainer.max_steps=2", "--overwrite"], tmp_path / "saving.log")
    terminate_when(process, lambda: any(output.glob(".partial-*")))
    checkpoint_of(output)  # none, the previous checkpoint or the new one: whichever is there loads

    assert main([*map(str, args), "trainer.max_steps=2", "--overwrite", "--quiet"]) == 0
    assert not list(output.glob(".partial-*"))
    assert checkpoint_of(output) is not None
