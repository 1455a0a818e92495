"""Run a checkpoint over cell files and write one ``.h5ad``: the engine of ``transcriptformer inference``.

Each process (one, or one per GPU, see :mod:`~transcriptformer.inference.distributed`):

1. prepares its :class:`~transcriptformer.inference.session.Session`: the model, the open inputs, the work units;
2. runs its units (unit ``k`` goes to process ``k mod N``) through the batch loop
   (:func:`transcriptformer.pipeline.predict_gene_outputs`) and saves each unit's outputs as soon as it is done
   (:mod:`~transcriptformer.inference.parts`);
3. rank 0 merges the units in input order, writes the ``.h5ad`` atomically
   (:mod:`~transcriptformer.inference.output`), prints a summary (:mod:`~transcriptformer.inference.report`;
   not under ``--quiet``) and, last, ``Output: <path>``.

The process the user started (rank 0 under torchrun) holds the output for the whole run
(:func:`~transcriptformer.inference.output.claim_output`): its location is checked before anything is loaded, a
second run on the same output fails at once, and temporary files of runs killed while writing it are removed.

A cell's outputs depend on the cell alone: not on its batch mates, the batch size, or which process ran it.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from transcriptformer.console import progress_bar, say
from transcriptformer.errors import UserError
from transcriptformer.inference import distributed, parts
from transcriptformer.inference.config import RunConfig
from transcriptformer.inference.distributed import Rank
from transcriptformer.inference.output import (
    ObsFinisher,
    claim_output,
    concat_frames,
    concat_var,
    remove_stale_temporaries,
    write_output,
)
from transcriptformer.inference.report import (
    counted,
    describe_source,
    embedding_info,
    format_plan,
    format_summary,
    run_metadata,
)
from transcriptformer.inference.session import (
    SOURCE_FILE_COLUMN,
    Session,
    WorkUnit,
    output_file_of,
    prepare,
    read_units,
)
from transcriptformer.inference.soma_output import claim_soma_output, local_path, write_soma_embeddings
from transcriptformer.pipeline import MemoryLimit, predict_gene_outputs
from transcriptformer.runtime import resolve_device, use_cpu_threads


def process_units(session: Session, units: Sequence[WorkUnit], rank: Rank) -> None:
    """Run ``units`` and save each one's outputs, in input order of its cells, as soon as it is done.

    With ``resume``, units whose outputs are already saved are skipped.
    """
    units = parts.units_to_run(session, list(units))
    settings = session.config.inference.predict_settings
    limit = MemoryLimit()  # lowered by an out-of-memory error, for the rest of the run
    n_cells = sum(unit.stop - unit.start for unit in units)
    description = f"rank {rank.rank}" if rank.world_size > 1 else "inference"
    with progress_bar(total=n_cells, unit="cell", desc=description, position=rank.rank, disable=None, delay=1) as bar:
        for unit, cells in read_units(session, units):
            outputs = predict_gene_outputs(
                session.model, cells, settings, session.device, session.gene_columns, on_batch=bar.update, limit=limit
            )
            parts.save_part(outputs, parts.part_file(session, unit))


def merge_and_write(session: Session, world_size: int, finish_obs: ObsFinisher | None = None) -> list[str]:
    """Merge every unit's outputs in input order into the outputs (the ``.h5ad``, the SOMA array, or both).

    ``finish_obs`` adds columns computed from every cell's per-cell numbers
    (:func:`~transcriptformer.inference.output.write_output`). A failed write (a full disk) leaves an existing
    output as it was and the units resumable.

    Returns
    -------
    list of str
        Where the outputs are.
    """
    inference = session.config.inference
    written = []
    if inference.writes_h5ad:
        write_h5ad(session, world_size, finish_obs)
        written.append(str(session.output_file.resolve()))
    if inference.writes_soma:
        write_soma(session)
        local = local_path(inference.output_soma)
        written.append(str(local.resolve()) if local else inference.output_soma)
    return written


def write_h5ad(session: Session, world_size: int, finish_obs: ObsFinisher | None) -> None:
    """Write the ``.h5ad`` from the saved units, one unit in memory at a time."""
    obs = concat_frames([f.obs for f in session.files])
    obs.index = obs.index.astype(str)  # a SOMA experiment without obs_id names its cells by joinid
    obs[SOURCE_FILE_COLUMN] = pd.Categorical(obs[SOURCE_FILE_COLUMN], categories=[f.name for f in session.files])
    chunks = (parts.load_part(parts.part_file(session, unit)) for unit in session.units)
    metadata = run_metadata(session, world_size)
    var = concat_var([f.var for f in session.files], session.genes)
    try:
        write_output(session.output_file, obs, var, chunks, metadata, session.config.inference.overwrite, finish_obs)
    except OSError as error:
        raise parts.write_failed(session.output_file, error, parts.parts_dir(session)) from error


def write_soma(session: Session) -> None:
    """Write the cell embeddings into the SOMA array ``output_soma`` from the saved units, a few at a time."""
    uri = session.config.inference.output_soma
    chunks = (
        (session.unit_joinids(unit), parts.load_part(parts.part_file(session, unit)).cell_values["embeddings"])
        for unit in session.units
    )
    first = next(chunks)
    n_rows = int(session.files[0].cells.reader.joinids[-1]) + 1
    try:
        write_soma_embeddings(uri, itertools.chain([first], chunks), n_rows, first[1].shape[1], embedding_info(session))
    except OSError as error:
        fix = "free disk space" if local_path(uri) else "remove what was written there, check the storage's access"
        raise parts.write_failed(uri, error, parts.parts_dir(session), fix) from error


def run_worker(
    rank: Rank, init_method: str | None, config: RunConfig, started: float, finish_obs: ObsFinisher | None = None
) -> None:
    """Everything one process does: prepare, run its units, and (rank 0) merge, write and report.

    ``started`` is the run's start (``time.time()``), for the summary; ``finish_obs`` as for
    :func:`merge_and_write`.
    """
    device = distributed.device_of(rank, resolve_device(config.inference.device))
    threads = use_cpu_threads(reserved=config.inference.n_data_workers, processes=rank.world_size)
    with (
        distributed.process_group(rank, init_method),
        prepare(config, device, distributed.shared_scan(rank)) as session,
    ):
        if rank.is_main:
            say(
                f"Running {session.n_cells} cells from {describe_source(session)} on {device.type} "
                f"({counted(rank.world_size, 'process')}, {counted(threads, 'CPU thread')}"
                f"{' each' if rank.world_size > 1 else ''}), precision {session.precision}"
            )
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
                print(
                    f"Interrupted: finished units are kept in {parts.parts_dir(session)}; rerun with --resume",
                    flush=True,
                )
            raise
        if rank.is_main:
            written = merge_and_write(session, rank.world_size, finish_obs)
            shutil.rmtree(parts.parts_dir(session))
            say(format_summary(session, rank.world_size, time.time() - started))
            for output in written:
                print(f"Output: {output}", flush=True)


def run_inference(config: RunConfig, *, dry_run: bool = False, finish_obs: ObsFinisher | None = None) -> Path:
    """Run inference as configured and return the output file's path (with ``output_format`` soma, its place).

    Parameters
    ----------
    config
        Every setting; see :class:`~transcriptformer.inference.config.RunConfig`.
    dry_run
        Check the checkpoint, the inputs and their overlap with the vocabulary, print the plan, write nothing.
    finish_obs
        Adds obs columns computed from every cell's per-cell outputs before the output is written (picklable,
        for runs of several processes); see :func:`~transcriptformer.inference.output.write_output`.

    Notes
    -----
    Under torchrun each process runs its share; otherwise ``num_gpus`` > 1 spawns that many processes.
    """
    started = time.time()
    device = resolve_device(config.inference.device)
    launched = distributed.torchrun_rank()
    world_size = launched.world_size if launched else distributed.resolve_world_size(device, config.inference.num_gpus)
    if dry_run:
        with prepare(config, device) as session:
            print(format_plan(session, world_size))
        return output_file_of(config)
    path = output_file_of(config)
    if launched and not launched.is_main:  # rank 0 holds the output
        run_worker(launched, "env://", config, started, finish_obs)
        return path
    inference = config.inference
    with claim_output(path, inference.overwrite, writes=inference.writes_h5ad), contextlib.ExitStack() as claims:
        if inference.writes_soma:
            claims.enter_context(claim_soma_output(inference.output_soma, inference.overwrite))
        for stale in remove_stale_temporaries(path):
            print(f"Removed {stale}, left by a run killed while writing the output", flush=True)
        if launched:
            run_worker(launched, "env://", config, started, finish_obs)
        elif world_size > 1:
            distributed.spawn(run_worker, world_size, config, started, finish_obs)
        else:
            run_worker(Rank(), None, config, started, finish_obs)
    return path
