"""The engine that runs every job over cells: settings of a run, the task protocol, the run from files and in memory.

>>> from transcriptformer.engine import RunConfig, run_task
>>> from transcriptformer.tasks.embed import EmbedTask
>>> run_task(EmbedTask(), RunConfig.from_checkpoint("ckpt", data_files=["cells.h5ad"], batch_size=16))

The names below are imported on first use, so that reading the settings does not load torch.
"""

import importlib

_EXPORTS = {
    "BatchLoopTask": "transcriptformer.engine.task",
    "HardwareConfig": "transcriptformer.engine.config",
    "InputConfig": "transcriptformer.engine.config",
    "MemoryResult": "transcriptformer.engine.run",
    "OutputConfig": "transcriptformer.engine.config",
    "RunConfig": "transcriptformer.engine.config",
    "Task": "transcriptformer.engine.task",
    "apply_overrides": "transcriptformer.engine.config",
    "contextual_embeddings": "transcriptformer.engine.output",
    "run_in_memory": "transcriptformer.engine.run",
    "run_task": "transcriptformer.engine.run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
