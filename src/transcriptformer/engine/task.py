"""What a job tells the engine: the :class:`Task` protocol, and :class:`BatchLoopTask`, its usual implementation.

The engine (:func:`~transcriptformer.engine.run.run_task` for files, :func:`~transcriptformer.engine.run.run_in_memory`
for the Python API) owns everything a job shares: reading and streaming cells, the batch loop, precision, device
and CPU threads, work units, resume, several processes, the output lock and the atomic writers. A task owns what
makes its job: its settings, the outputs it asks of the model, the checks of its settings against the run, how it
turns a unit of cells into outputs, the obs columns it adds and how it finishes once every cell is done. The
engine calls a task's methods and never imports a task module or names one of its columns.

The engine calls, in this order (every process runs steps 3-4 for its units; rank 0 alone runs 5-6)::

    1. task.check(config)                    before anything is loaded: settings against the run's
    2. task.added_obs_columns()              while opening the inputs: input obs columns of these names are an error
       task.planned_rows(input_cells)        once the inputs are open: None (units of the input cells), or the
                                             number of rows the task plans itself (units of rows, cells None)
       task.check_plan(session)              process 0, once the units are planned, before any runs: the work
                                             planned against the machine (the output's disk space)
       task.progress(session, units)         the total of the progress bar over a process's units, and its unit
    3. task.output_keys(config)              the model outputs of each unit's batch loop
    4. task.run_unit(session, unit, cells, ...)  per work unit: its Part, saved at once (resume)
    5. task.finish(obs)                      obs of every row, per-row numbers included: the obs to write and
                                             the uns entries to add, in the output's one atomic write
       task.output_var(session)              the var of the per-gene outputs (None: the inputs' matched genes)
       task.main_layer(layers)               the per-gene layer that X holds
       task.summarize(obs, outputs, genes)   uns entries reduced from every row's outputs, read a part at a time
       task.write_files(folder, obs, uns)    the task's files beside the output (task.output_files(config)),
                                             moved into place with the output in its one atomic write
    6. task.describe(uns)                    lines printed before the output's path (``Output: <path>``, last)

``check`` refuses settings before it imports anything heavy: the command line runs it before torch loads
(:func:`transcriptformer.cli.common.run_task`), so that a mistake in the arguments is reported at once.

In memory (the Python API), steps 1-5 (without ``write_files``) run in the calling process, on the same units, and
``task.write_into(adata, result)`` stores the results in the user's AnnData instead of step 6.

A task is a picklable object (a dataclass): several processes each get a copy. Its ``settings`` (a dataclass)
are part of the run's description, so a resumed run with other task settings is refused, and are recorded in
``uns["transcriptformer"]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # a task module is imported by the command line before torch: the heavy imports wait for a run
    import anndata as ad
    import numpy as np
    import pandas as pd

    from transcriptformer.data.tokenize import TokenizedCells
    from transcriptformer.engine.config import RunConfig
    from transcriptformer.engine.run import MemoryResult
    from transcriptformer.engine.session import Session, WorkUnit
    from transcriptformer.pipeline import GeneOutputs, MemoryLimit


@dataclasses.dataclass
class Part:
    """The outputs of one work unit, as saved (:mod:`~transcriptformer.engine.parts`) and written.

    Attributes
    ----------
    outputs : GeneOutputs
        One row per output row, ``outputs.n_cells`` rows. ``cell_values`` holds the model's per-cell outputs (their
        AnnData slot is their entry of :data:`~transcriptformer.model.outputs.OUTPUTS`) and any other per-row array
        of the task: one value per row goes to obs, a vector per row to obsm (strings, numbers or booleans).
    obs : DataFrame or None
        ``None``: the rows are the unit's cells, in order (the output's obs is the inputs'). Otherwise the rows'
        own obs (index: row names; columns of strings, numbers or booleans), for a task whose rows are not the
        input cells (:attr:`Task.rows_are_cells` ``False``).
    cells : ndarray or None
        With ``obs``: each row's input cell, as its position among the unit's cells (``(n_rows,)`` int), for rows
        made from input cells (a perturbation of a cell); the engine carries that cell's obs columns into the row's
        obs, after the task's own columns (a column of the task's name keeps the task's values). ``None``: rows
        not made from one input cell (generated cells).
    """

    outputs: GeneOutputs
    obs: pd.DataFrame | None = None
    cells: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        """Rows of the part."""
        return self.outputs.n_cells


@runtime_checkable
class Task(Protocol):
    """A job the engine runs; see the module docstring for when each method is called.

    Attributes
    ----------
    name : str
        The job's name (``"inference"``, ``"score"``): in progress bars, the run's description and its metadata.
    settings : dataclass or None
        The job's own settings (not those of the run, which are the engine's
        :class:`~transcriptformer.engine.config.RunConfig`).
    rows_are_cells : bool
        Whether the output has one row per input cell, in input order (its obs: the inputs'); otherwise each part
        brings its rows' obs (:class:`Part`), and the output's rows are those of the parts in unit order.
    """

    name: str
    settings: Any
    rows_are_cells: bool

    def check(self, config: RunConfig) -> None:
        """Raise a ``ValueError`` naming the setting to change when the run cannot do this job."""

    def output_keys(self, config: RunConfig) -> tuple[str, ...]:
        """The model outputs (:data:`~transcriptformer.model.outputs.OUTPUT_KEYS`) that each unit computes."""

    def added_obs_columns(self) -> tuple[str, ...]:
        """Obs columns the task writes besides the model's per-cell outputs."""

    def planned_rows(self, input_cells: int | None) -> int | None:
        """``None`` when the work units are the input cells'; else the number of rows that the task plans itself.

        Given the number of input cells (``None``: no input); the rows are cut into units of ``chunk_size`` rows
        (``unit.file_index`` :data:`~transcriptformer.engine.session.TASK_ROWS`); a task that needs no input
        cells returns a number for ``None``. Raises a ``ValueError`` naming the setting to change when it cannot
        plan.
        """

    def check_plan(self, session: Session) -> None:
        """Raise a ``ValueError`` naming what to change when the planned units cannot be done (before any runs)."""

    def progress(self, session: Session, units: Sequence[WorkUnit]) -> tuple[int, str]:
        """The work of ``units`` in the progress bar's unit, and that unit's name (``"cell"``, ``"pair"``)."""

    def run_unit(
        self,
        session: Session,
        unit: WorkUnit,
        cells: TokenizedCells | None,
        on_batch: Callable[[int], object],
        limit: MemoryLimit,
    ) -> Part:
        """The outputs of one unit's cells (per-gene outputs on the session's gene axis), or of its planned rows.

        ``on_batch`` takes the work done, in the unit of :meth:`progress` (the progress bar); ``limit`` is the batch
        loop's memory limit, kept across units. ``session.files[unit.file_index].obs_rows(unit.start, unit.stop)``
        is the cells' obs. ``cells`` is ``None`` for a unit of rows that the task plans (:meth:`planned_rows`),
        which reads what it needs of the inputs itself (``session.files``).
        """

    def output_var(self, session: Session) -> pd.DataFrame | None:
        """The var of the per-gene outputs (index the genes' ids) when they are not on the session's gene axis."""

    def main_layer(self, layers: Collection[str]) -> str | None:
        """The per-gene output among ``layers`` that the output's ``X`` holds; ``None``: no genes, an empty ``X``."""

    def finish(self, obs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
        """The obs to write and the uns entries to add, given the obs of every row with its per-row numbers."""

    def summarize(self, obs: pd.DataFrame, outputs: Iterable[GeneOutputs], genes: pd.Index) -> dict:
        """More uns entries, reduced from every row's outputs (after :meth:`finish`, whose obs this is).

        ``outputs`` yields the parts' outputs in row order, one part in memory at a time; ``genes`` are the gene ids
        of their per-gene columns.
        """

    def output_files(self, config: RunConfig) -> tuple[str, ...]:
        """Names of the files that :meth:`write_files` writes beside the output; an existing one needs ``overwrite``."""

    def write_files(self, folder: Path, obs: pd.DataFrame, uns: dict) -> None:
        """Write :meth:`output_files` into ``folder`` (temporary: the engine moves them beside the output with it).

        ``obs`` and ``uns`` are those written to the output (the uns entries of :meth:`finish` and :meth:`summarize`).
        """

    def describe(self, uns: dict) -> list[str]:
        """Lines printed before the output's path (the last line), from the uns entries that :meth:`finish` added."""

    def write_into(self, adata: ad.AnnData, result: MemoryResult) -> None:
        """Store an in-memory run's results in the user's AnnData (the Python API; scvi-tools style)."""


@dataclasses.dataclass
class BatchLoopTask:
    """A task whose outputs are the batch loop's outputs of the run's ``output_keys``, one row per cell.

    Subclasses override what their job changes (score: :meth:`check`, :meth:`added_obs_columns`, :meth:`finish`,
    :meth:`describe`).
    """

    name: str = "inference"
    settings: Any = None
    rows_are_cells: bool = True

    def check(self, config: RunConfig) -> None:
        """Nothing to check beyond the run's own settings."""

    def output_keys(self, config: RunConfig) -> tuple[str, ...]:
        """The run's ``output_keys``."""
        return config.predict.output_keys

    def added_obs_columns(self) -> tuple[str, ...]:
        """None."""
        return ()

    def planned_rows(self, input_cells: int | None) -> int | None:
        """``None``: one row per input cell."""
        return None

    def output_var(self, session: Session) -> pd.DataFrame | None:
        """``None``: the per-gene outputs are on the inputs' matched genes."""
        return None

    def check_plan(self, session: Session) -> None:
        """Nothing to check: the output of a row per cell is small beside its inputs."""

    def progress(self, session: Session, units: Sequence[WorkUnit]) -> tuple[int, str]:
        """The cells (or planned rows) of ``units``."""
        return sum(unit.stop - unit.start for unit in units), "cell"

    def main_layer(self, layers: Collection[str]) -> str | None:
        """The first of :data:`~transcriptformer.model.outputs.MAIN_MATRIX_ORDER` among ``layers``."""
        from transcriptformer.model.outputs import main_matrix_key

        return main_matrix_key(layers)

    def run_unit(
        self,
        session: Session,
        unit: WorkUnit,
        cells: TokenizedCells,
        on_batch: Callable[[int], object],
        limit: MemoryLimit,
    ) -> Part:
        """The batch loop (:func:`~transcriptformer.pipeline.predict_gene_outputs`) over the unit's cells."""
        from transcriptformer.pipeline import predict_gene_outputs

        settings = dataclasses.replace(session.config.predict, output_keys=self.output_keys(session.config))
        outputs = predict_gene_outputs(
            session.model, cells, settings, session.device, session.gene_columns, on_batch=on_batch, limit=limit
        )
        return Part(outputs)

    def finish(self, obs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
        """Obs as it is, no uns entry."""
        return obs, {}

    def summarize(self, obs: pd.DataFrame, outputs: Iterable[GeneOutputs], genes: pd.Index) -> dict:
        """No uns entry (the outputs are not read)."""
        return {}

    def output_files(self, config: RunConfig) -> tuple[str, ...]:
        """None: the output alone."""
        return ()

    def write_files(self, folder: Path, obs: pd.DataFrame, uns: dict) -> None:
        """Nothing to write."""

    def describe(self, uns: dict) -> list[str]:
        """No line."""
        return []

    def write_into(self, adata: ad.AnnData, result: MemoryResult) -> None:
        """The obs columns and uns entries of ``result``; a task with array outputs places them itself."""
        for column in result.obs.columns:
            adata.obs[column] = result.obs[column].to_numpy()
        adata.uns.update(result.uns)


def task_description(task: Task) -> dict:
    """The task's name and settings as plain values: part of a run's description and metadata."""
    settings = task.settings
    return {"name": task.name, "settings": dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else {}}
