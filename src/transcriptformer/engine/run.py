"""Run a task over cells: from files to one ``.h5ad`` (:func:`run_task`), or in memory (:func:`run_in_memory`).

Each process of :func:`run_task` (one, or one per GPU, see :mod:`~transcriptformer.engine.distributed`):

1. prepares its :class:`~transcriptformer.engine.session.Session`: the task, the model, the open inputs, the work
   units;
2. runs its units (unit ``k`` goes to process ``k mod N``) through the task
   (:meth:`Task.run_unit <transcriptformer.engine.task.Task.run_unit>`, by default the batch loop) and saves each
   unit's outputs as soon as it is done (:mod:`~transcriptformer.engine.parts`);
3. rank 0 merges the units in input order, lets the task finish the obs of all cells, writes the ``.h5ad``
   atomically (:mod:`~transcriptformer.engine.output`), prints a summary (:mod:`~transcriptformer.engine.report`;
   not under ``--quiet``), the task's lines (:meth:`Task.describe`) and, last, ``Output: <path>``.

The process the user started (rank 0 under torchrun) holds the output for the whole run
(:func:`~transcriptformer.engine.output.claim_output`): its location is checked before anything is loaded, a
second run on the same output fails at once, and temporary files of runs killed while writing it are removed.

A cell's outputs depend on the cell alone: not on its batch mates, the batch size, or which process ran it.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from transcriptformer.checkpoint import Checkpoint
from transcriptformer.console import print_output, progress_bar, say, worded
from transcriptformer.engine import distributed, parts
from transcriptformer.engine.config import COUNTS_LAYER, RunConfig
from transcriptformer.engine.distributed import Rank
from transcriptformer.engine.output import (
    claim_output,
    concat_frames,
    concat_var,
    remove_stale_temporaries,
    row_slot,
    with_symbols,
    write_output,
)
from transcriptformer.engine.report import (
    counted,
    describe_source,
    embedding_info,
    format_plan,
    format_summary,
    run_metadata,
)
from transcriptformer.engine.session import (
    SOURCE_FILE_COLUMN,
    Session,
    WorkUnit,
    open_session,
    output_file_of,
    prepare,
    read_units,
)
from transcriptformer.engine.soma_output import claim_soma_output, local_path, write_soma_embeddings
from transcriptformer.engine.task import Part, Task
from transcriptformer.errors import UserError
from transcriptformer.pipeline import GeneOutputs, MemoryLimit
from transcriptformer.runtime import resolve_device, use_cpu_threads


def process_units(session: Session, units: Sequence[WorkUnit], rank: Rank) -> None:
    """Run ``units`` through the session's task and save each one's outputs, in input order, as soon as it is done.

    With ``resume``, units whose outputs are already saved are skipped.
    """
    units = parts.units_to_run(session, list(units))
    limit = MemoryLimit()  # lowered by an out-of-memory error, for the rest of the run
    total, unit_name = session.task.progress(session, units)
    description = f"rank {rank.rank}" if rank.world_size > 1 else session.task.name
    with progress_bar(total=total, unit=unit_name, desc=description, position=rank.rank, disable=None, delay=1) as bar:
        for unit, cells in read_units(session, units):
            part = session.task.run_unit(session, unit, cells, bar.update, limit)
            check_rows(session.task, unit, part)
            parts.save_part(part, parts.part_file(session, unit))


def check_rows(task: Task, unit: WorkUnit, part: Part) -> None:
    """Raise a ``ValueError`` when ``part`` does not hold the rows that ``task`` declares (a task's defect)."""
    if task.rows_are_cells and (part.obs is not None or part.n_rows != unit.stop - unit.start):
        raise ValueError(
            f"task {task.name} returned {part.n_rows} rows{' with obs' if part.obs is not None else ''} for the "
            f"{unit.stop - unit.start} cells of unit {unit.index}, and its rows are the cells"
        )
    if not task.rows_are_cells and (part.obs is None or len(part.obs) != part.n_rows):
        raise ValueError(f"task {task.name} returned a unit without the obs of its {part.n_rows} rows")
    cells = part.cells
    if cells is not None and (len(cells) != part.n_rows or np.any((cells < 0) | (cells >= unit.stop - unit.start))):
        raise ValueError(f"task {task.name} named input cells outside unit {unit.index} for its rows")


def rows_obs(session: Session, unit: WorkUnit, part: Part) -> pd.DataFrame:
    """The obs of a part whose rows are not the cells: the task's columns, then those of each row's input cell.

    A row made from an input cell (:attr:`Part.cells`) gets that cell's obs columns (``cell_type``, ...), but for
    columns that the task writes itself.
    """
    if part.cells is None:
        return part.obs
    cells = session.files[unit.file_index].obs_rows(unit.start, unit.stop)
    carried = cells.drop(columns=[c for c in cells.columns if c in part.obs.columns]).iloc[part.cells]
    return pd.concat([part.obs, carried.set_axis(part.obs.index)], axis=1)


def merge_and_write(session: Session, world_size: int) -> tuple[list[str], dict]:
    """Merge every unit's outputs in input order into the outputs (the ``.h5ad``, the SOMA array, or both).

    The task finishes the obs of every cell (:meth:`Task.finish`) in the ``.h5ad``'s one atomic write
    (:func:`~transcriptformer.engine.output.write_output`). A failed write (a full disk) leaves an existing output
    as it was and the units resumable.

    Returns
    -------
    written, uns
        Where the outputs are, and the uns entries that the task added.
    """
    output = session.config.output
    written, added = [], {}
    if output.writes_h5ad:
        added = write_h5ad(session, world_size)
        written.append(str(session.output_file.resolve()))
    if output.writes_soma:
        write_soma(session)
        local = local_path(output.output_soma)
        written.append(str(local.resolve()) if local else output.output_soma)
    return written, added


def write_h5ad(session: Session, world_size: int) -> dict:
    """Write the ``.h5ad`` from the saved units, one unit in memory at a time; returns the task's uns entries."""
    if session.task.rows_are_cells:
        obs = concat_frames([f.obs for f in session.files])
        obs[SOURCE_FILE_COLUMN] = pd.Categorical(obs[SOURCE_FILE_COLUMN], categories=[f.name for f in session.files])
    else:  # the rows of the parts: read once for the obs (small), again for the outputs
        obs = concat_frames(
            [rows_obs(session, unit, parts.load_part(parts.part_file(session, unit))) for unit in session.units]
        )
    obs.index = obs.index.astype(str)  # a SOMA experiment without obs_id names its cells by joinid
    chunks = (parts.load_part(parts.part_file(session, unit)).outputs for unit in session.units)
    metadata = run_metadata(session, world_size)
    var = session.task.output_var(session)
    if var is None:
        var = concat_var([f.var for f in session.files], session.genes)
    var, main_layer = with_symbols(var), session.task.main_layer
    if session.config.output.keep_counts:
        chunks, var, main_layer = with_input_counts(session, chunks)
    task, added, finished = session.task, {}, {}

    def finish(obs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
        obs, uns = task.finish(obs)
        rows = (parts.load_part(parts.part_file(session, unit)).outputs for unit in session.units)
        uns = uns | task.summarize(obs, rows, session.genes)
        added.update(uns)
        finished["obs"] = obs
        return obs, uns

    files = (task.output_files(session.config), lambda folder: task.write_files(folder, finished["obs"], added))
    overwrite = session.config.output.overwrite
    try:
        write_output(session.output_file, obs, var, chunks, metadata, overwrite, finish, main_layer, files)
    except OSError as error:
        raise parts.write_failed(session.output_file, error, parts.parts_dir(session)) from error
    return added


def with_input_counts(
    session: Session, chunks: Iterable[GeneOutputs]
) -> tuple[Iterator[GeneOutputs], pd.DataFrame, Callable[[Collection[str]], str]]:
    """The outputs as a copy of the one input file (``keep_counts``): its counts in ``X``, the outputs on its genes.

    Returns the chunks (each with the counts of its cells as the run read them, in the stored type, as layer
    :data:`COUNTS_LAYER`; every per-gene output, and the genes of contextual embeddings, moved onto the input's var
    columns), the input's var (of ``raw`` when the counts came from there), and the choice of ``X``: the counts.
    """
    file = session.files[0]
    reader, kept = file.cells.reader, file.cells
    n_vars = len(reader.var)
    known = pd.Index(file.var.index).drop_duplicates()
    columns = np.asarray(kept.selection.columns)[known.get_indexer(session.genes)]  # gene axis -> input column

    def copied() -> Iterator[GeneOutputs]:
        for unit, outputs in zip(session.units, chunks, strict=True):
            rows = kept.source_rows(unit.start, unit.stop)  # a unit holds a cell or more
            counts = sp.csr_matrix(reader.rows(int(rows[0]), int(rows[-1]) + 1)[rows - rows[0]])
            moved = {key: on_input_genes(m, columns, n_vars) for key, m in outputs.gene_values.items()}
            outputs.gene_values = {COUNTS_LAYER: counts, **moved}
            if outputs.cge:
                outputs.cge["gene_index"] = columns[outputs.cge["gene_index"]]
            yield outputs

    return copied(), reader.var, lambda layers: COUNTS_LAYER


def on_input_genes(matrix: sp.csr_matrix, columns: np.ndarray, n_vars: int) -> sp.csr_matrix:
    """``matrix`` (cells x gene axis) on the input's ``n_vars`` genes: gene-axis column ``j`` to ``columns[j]``."""
    moved = sp.csr_matrix((matrix.data, columns[matrix.indices], matrix.indptr), shape=(matrix.shape[0], n_vars))
    moved.sort_indices()
    return moved


def write_soma(session: Session) -> None:
    """Write the cell embeddings into the SOMA array ``output_soma`` from the saved units, a few at a time."""
    uri = session.config.output.output_soma
    chunks = (
        (session.unit_joinids(unit), parts.load_part(parts.part_file(session, unit)).outputs.cell_values["embeddings"])
        for unit in session.units
    )
    first = next(chunks)
    n_rows = session.files[0].cells.reader.max_joinid + 1
    try:
        write_soma_embeddings(uri, itertools.chain([first], chunks), n_rows, first[1].shape[1], embedding_info(session))
    except OSError as error:
        fix = "free disk space" if local_path(uri) else "remove what was written there, check the storage's access"
        raise parts.write_failed(uri, error, parts.parts_dir(session), fix) from error


def run_worker(rank: Rank, init_method: str | None, task: Task, config: RunConfig, started: float) -> None:
    """Everything one process does: prepare, run its units, and (rank 0) merge, write and report.

    ``started`` is the run's start (``time.time()``), for the summary.
    """
    device = distributed.device_of(rank, resolve_device(config.hardware.device))
    threads = use_cpu_threads(reserved=config.hardware.n_data_workers, processes=rank.world_size)
    with (
        distributed.process_group(rank, init_method),
        prepare(config, device, task, distributed.shared_scan(rank)) as session,
    ):
        if rank.is_main:
            say(
                f"Running {session.n_cells} cells from {describe_source(session)} on {device.type} "
                f"({counted(rank.world_size, 'process')}, {counted(threads, 'CPU thread')}"
                f"{' each' if rank.world_size > 1 else ''}), precision {session.precision}"
            )
            session.task.check_plan(session)
            done = parts.open_parts_dir(session)
            if done:
                say(f"Resuming: {done} of {len(session.units)} units were already done")
        distributed.barrier(rank)
        try:
            process_units(session, session.units[rank.rank :: rank.world_size], rank)
            distributed.barrier(rank)
        except (UserError, ValueError, KeyError):
            raise  # the message says what to do; the same run resumed would fail the same way
        except BaseException:
            if rank.is_main:
                kept = f"Interrupted: finished units are kept in {parts.parts_dir(session)}; rerun with `resume=True`"
                print(worded(kept), flush=True)
            raise
        if rank.is_main:
            written, added = merge_and_write(session, rank.world_size)
            shutil.rmtree(parts.parts_dir(session))
            say(format_summary(session, rank.world_size, time.time() - started))
            for line in task.describe(added):
                print(line, flush=True)
            for output in written:  # the last lines, as every command ends
                print_output(output)


def run_task(task: Task, config: RunConfig, *, dry_run: bool = False, checked: bool = False) -> Path:
    """Run ``task`` over the inputs of ``config`` and return the output file's path (``output_format`` soma: its place).

    Parameters
    ----------
    task
        The job (:class:`~transcriptformer.engine.task.Task`); checked against ``config`` before anything is loaded.
    config
        Every setting of the run; see :class:`~transcriptformer.engine.config.RunConfig`.
    dry_run
        Check the checkpoint, the inputs and their overlap with the vocabulary, print the plan, write nothing.
    checked
        The caller has run ``task.check(config)`` already (the command line does, before torch loads).

    Notes
    -----
    Under torchrun each process runs its share; otherwise ``num_gpus`` > 1 spawns that many processes.
    """
    started = time.time()
    if not checked:
        task.check(config)
    if config.output.keep_counts and not task.rows_are_cells:
        raise ValueError(f"keep_counts copies the input's cells, and the rows of task {task.name} are not the cells")
    if config.output.writes_soma and not task.rows_are_cells:
        raise ValueError(f"output_soma holds a row per input cell, and the rows of task {task.name} are not the cells")
    device = resolve_device(config.hardware.device)
    launched = distributed.torchrun_rank()
    world_size = launched.world_size if launched else distributed.resolve_world_size(device, config.hardware.num_gpus)
    if dry_run:
        with prepare(config, device, task) as session:
            print(worded(format_plan(session, world_size)))
        return output_file_of(config)
    path = output_file_of(config)
    if launched and not launched.is_main:  # rank 0 holds the output
        run_worker(launched, "env://", task, config, started)
        return path
    output = config.output
    beside = task.output_files(config)
    with claim_output(path, output.overwrite, output.writes_h5ad, beside), contextlib.ExitStack() as claims:
        if output.writes_soma:
            claims.enter_context(claim_soma_output(output.output_soma, output.overwrite))
        for stale in remove_stale_temporaries(path):
            print(f"Removed {stale}, left by a run killed while writing the output", flush=True)
        if launched:
            run_worker(launched, "env://", task, config, started)
        elif world_size > 1:
            distributed.spawn(run_worker, world_size, task, config, started)
        else:
            run_worker(Rank(), None, task, config, started)
    return path


@dataclass
class MemoryResult:
    """What :func:`run_in_memory` computed, for the Python API to place into the user's AnnData.

    Attributes
    ----------
    obs : DataFrame
        One row per output row (for most tasks: per cell kept, in input order, index the cells' names): the rows'
        own obs when the task brings it (:class:`~transcriptformer.engine.task.Part`), the per-row numbers, then the
        task's columns (:meth:`Task.finish`); no input column.
    outputs : GeneOutputs
        Every row's outputs; per-gene outputs on the input's matched genes, column ``i`` being the input's var
        row ``var_rows[i]``.
    uns : dict
        The entries that the task added.
    var_rows : ndarray
        Position of each matched gene among the var of the counts read (``adata.raw.var`` when ``from_raw``).
    genes_read : Index
        The var names of the matched genes, in the order of the per-gene outputs' columns.
    from_raw : bool
        Whether the counts came from ``adata.raw`` (whose var is not ``adata.var``).
    gene_ids : Index
        The gene ids of the matched genes, in the order of the per-gene outputs' columns.
    """

    obs: pd.DataFrame
    outputs: GeneOutputs
    uns: dict
    var_rows: np.ndarray
    genes_read: pd.Index
    from_raw: bool
    gene_ids: pd.Index


def run_in_memory(
    task: Task,
    checkpoint: Checkpoint,
    data: ad.AnnData | str | Path | None,
    config: RunConfig,
    device: torch.device,
) -> MemoryResult:
    """Run ``task`` over the cells of ``data`` in this process, without files: the engine of the Python API.

    The same task methods run as in :func:`run_task`, in the same order, on the same units of ``chunk_size``
    cells; nothing is written, the output lock and resume do not apply.

    Parameters
    ----------
    task
        The job.
    checkpoint
        Loaded with its adapters and gene embeddings (``config``'s ``model`` section says how to tokenize).
    data
        An AnnData (only read here), or the path of a ``.h5ad``, ``.zarr`` or 10x ``.h5`` file; ``None`` for a task
        that plans its own rows (:meth:`Task.planned_rows`) without input cells.
    config
        The run's settings; its input and output settings are not used.
    device
        Where the model is.
    """
    task.check(config)
    with open_session(config, checkpoint, device, task, data=data) as session:
        limit = MemoryLimit()
        done, row_obs = [], []
        for unit, cells in read_units(session, session.units):
            done.append(task.run_unit(session, unit, cells, lambda n: None, limit))
            check_rows(task, unit, done[-1])
            row_obs.append(None if task.rows_are_cells else rows_obs(session, unit, done[-1]))
        outputs = GeneOutputs.concat([part.outputs for part in done])
        if task.rows_are_cells:
            obs = pd.DataFrame(index=session.files[0].obs.index.astype(str))
        else:
            obs = concat_frames(row_obs)
        for key, values in outputs.cell_values.items():
            if row_slot(key, values) == "obs":
                obs[key] = values
        obs, uns = task.finish(obs)
        uns = uns | task.summarize(obs, [outputs], session.genes)
        if not session.files:  # a task that plans its own rows, without input cells
            return MemoryResult(obs, outputs, uns, np.zeros(0, dtype=np.int64), pd.Index([]), False, session.genes)
        reader, var_rows = session.files[0].cells.reader, np.asarray(session.files[0].cells.selection.columns)
        from_raw = isinstance(data, ad.AnnData) and reader.var is not data.var
    return MemoryResult(obs, outputs, uns, var_rows, reader.var.index[var_rows], from_raw, session.genes)
