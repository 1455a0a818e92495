"""What one process of a run works with: the task, the model, the open inputs, the gene axis and the work units.

:func:`prepare` loads the checkpoint with the run's settings (adapters, another species' gene embeddings, the
``esm2ce`` baseline), opens every input file for row-block reading, matches its genes with the vocabulary, and
cuts its cells into work units of ``chunk_size`` consecutive cells. It checks the counts in one pass over each
file (NaN, infinite, negative, non-integer, empty cells; :meth:`CellTokenizer.prepare`) and writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from transcriptformer.checkpoint import WEIGHTS_FILE, Checkpoint, load_checkpoint
from transcriptformer.data.soma import JOINID, SomaReader, obs_filter_rows
from transcriptformer.data.sources import CountReader, open_counts
from transcriptformer.data.tokenize import CellTokenizer, CountScanner, PreparedCells, TokenizedCells, scan_counts
from transcriptformer.engine.config import ALL_OBS_KEYS, RunConfig, output_file_name
from transcriptformer.engine.task import Task
from transcriptformer.errors import UserError
from transcriptformer.model.outputs import OUTPUTS
from transcriptformer.pipeline import Predictor
from transcriptformer.runtime import default_precision
from transcriptformer.safe_load import sha256_of

SOURCE_FILE_COLUMN = "source_file"
IN_MEMORY_NAME = "AnnData"  # the source_file of the cells of an in-memory AnnData
# obs columns that every output adds (a task adds its own: Task.added_obs_columns); an input column of the same name
# would be lost, so it is an error.
ENGINE_OBS_COLUMNS = (SOURCE_FILE_COLUMN, *(key for key, spec in OUTPUTS.items() if spec.anndata == "obs"))
# var column of the output that keeps each gene's var_name in the input (the output's var_names are gene ids).
INPUT_VAR_NAME_COLUMN = "input_var_name"


@dataclass
class InputFile:
    """One input, open for row-block reading: a file, or the cells of a SOMA experiment that a query selects.

    Attributes
    ----------
    name : str
        The file's path, or the experiment's URI, as given (the output's ``source_file``).
    cells : PreparedCells
        Its genes matched with the vocabulary and its cells that the cell filters keep; counts are read per unit.
    obs : DataFrame
        The obs of those cells, filtered to the requested columns, with ``source_file`` (and ``soma_joinid``).
    identity : list
        What a resumed run compares: a file's location, size and modification time; a query's experiment, number of
        cells and SHA-256 of their joinids.
    """

    name: str
    cells: PreparedCells
    obs: pd.DataFrame
    identity: list

    @property
    def n_genes(self) -> int:
        """Genes (columns) of the file's count matrix, before matching the vocabulary."""
        return len(self.cells.reader.var)

    @property
    def n_matched(self) -> int:
        """Genes of the file that the vocabulary holds."""
        return len(self.cells.selection.columns)

    @property
    def joinids(self) -> np.ndarray | None:
        """``soma_joinid`` of each cell of a SOMA input; ``None`` for a file."""
        return self.obs[JOINID].to_numpy(dtype=np.int64) if isinstance(self.cells.reader, SomaReader) else None

    @property
    def var(self) -> pd.DataFrame:
        """The file's var rows of its matched genes, indexed by gene id, with its var_names as ``input_var_name``."""
        var = self.cells.reader.var.iloc[self.cells.selection.columns]
        var = var.assign(**{INPUT_VAR_NAME_COLUMN: var.index.astype(str)})
        return var.set_axis(pd.Index(self.cells.selection.gene_ids))


# file_index of a unit of rows that its task plans itself (Task.planned_rows): no input file's cells.
TASK_ROWS = -1


@dataclass(frozen=True)
class WorkUnit:
    """Consecutive cells ``start:stop`` of one input file, or rows of the task (``file_index`` :data:`TASK_ROWS`).

    Outputs are saved per unit.
    """

    index: int
    file_index: int
    start: int
    stop: int


@dataclass
class Session:
    """Everything one process needs to run its share; close it to release the input files.

    Attributes
    ----------
    config : RunConfig
    task : Task
        The job the session's units run for.
    checkpoint : Checkpoint
        As loaded for the run (adapters merged, gene embeddings swapped).
    model : Predictor
        What computes the outputs: the checkpoint's model, or its ``esm2ce`` baseline.
    device : torch.device
    files : list of InputFile
    genes : Index
        Gene axis of the per-gene outputs: every matched gene, in order of first appearance.
    gene_columns : ndarray
        ``(vocab_size,)`` column of each vocabulary entry on the gene axis, ``-1`` when absent.
    units : list of WorkUnit
    precision : str
    """

    config: RunConfig
    task: Task
    checkpoint: Checkpoint
    model: Predictor
    device: torch.device
    files: list[InputFile]
    genes: pd.Index
    gene_columns: np.ndarray
    units: list[WorkUnit]
    precision: str
    open_files: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.open_files.close()

    @property
    def n_cells(self) -> int:
        """Cells of all input files."""
        return sum(len(f.cells) for f in self.files)

    @property
    def output_file(self) -> Path:
        """Where the merged ``.h5ad`` goes."""
        return output_file_of(self.config)

    @functools.cached_property
    def weights_sha256(self) -> str:
        """SHA-256 of the checkpoint's weights file, read once per run (it is large)."""
        return sha256_of(self.checkpoint.path / WEIGHTS_FILE)

    def unit_joinids(self, unit: WorkUnit) -> np.ndarray | None:
        """``soma_joinid`` of a unit's cells when they come from a SOMA experiment; ``None`` for a file."""
        joinids = self.files[unit.file_index].joinids
        return None if joinids is None else joinids[unit.start : unit.stop]

    def read_unit(self, unit: WorkUnit) -> TokenizedCells | None:
        """The tokenized cells of one unit, read from its file; ``None`` for rows that the task plans."""
        if unit.file_index == TASK_ROWS:
            return None
        return self.files[unit.file_index].cells.cells(unit.start, unit.stop)


def output_file_of(config: RunConfig) -> Path:
    """``output_path / output_filename``, named by :func:`~transcriptformer.engine.config.output_file_name`."""
    return Path(config.output.output_path) / output_file_name(config.output.output_filename)


def load_for_run(config: RunConfig, device: torch.device) -> Checkpoint:
    """The checkpoint with the run's settings, adapters and gene embeddings."""
    model = config.model
    checkpoint = load_checkpoint(
        model.checkpoint_path,
        device,
        config.hardware.attention_backend,
        config=config.checkpoint_config,
        adapter=model.adapter,
    )
    if model.pretrained_embedding:
        checkpoint = checkpoint.with_gene_embeddings(model.pretrained_embedding)
    return checkpoint


def prepare(config: RunConfig, device: torch.device, task: Task, scan: CountScanner = scan_counts) -> Session:
    """Load the model, open and check the inputs, and plan the work units of ``task``; writes nothing.

    The obs columns that ``task`` adds may not be among the inputs' kept columns; ``scan`` reads the counts once to
    check them (several processes share it:
    :func:`~transcriptformer.engine.distributed.shared_scan`).

    Whether the output may be written is for the caller to check
    (:func:`~transcriptformer.engine.output.claim_output`): a dry run reports an existing output instead of
    failing.
    """
    if not (config.input.data_files or config.input.reads_soma) and task.planned_rows(None) is None:
        raise ValueError("no input: give files with data_files, or a SOMA experiment with `soma` or census_version")
    return open_session(config, load_for_run(config, device), device, task, scan)


def open_session(
    config: RunConfig,
    checkpoint: Checkpoint,
    device: torch.device,
    task: Task,
    scan: CountScanner = scan_counts,
    data: ad.AnnData | str | Path | None = None,
) -> Session:
    """The session of a loaded ``checkpoint``: the inputs of ``config`` (or the in-memory ``data``) open and checked.

    ``checkpoint`` is loaded with ``config``'s checkpoint settings (:func:`load_for_run`), or given by the Python
    API, whose tokenizer settings are then ``config``'s ``data_config``.
    """
    inputs, chunk_size = config.input, config.output.chunk_size
    model = checkpoint.esm2ce() if config.model.model_type == "esm2ce" else checkpoint.model
    tokenizer = checkpoint.tokenizer(
        remove_duplicate_genes=inputs.remove_duplicate_genes, **dataclasses.asdict(config.model.data_config)
    )
    added = (*ENGINE_OBS_COLUMNS, *task.added_obs_columns())
    with contextlib.ExitStack() as open_files:
        if data is not None:
            reader = open_files.enter_context(open_counts(data, inputs.use_raw))
            name = IN_MEMORY_NAME if isinstance(data, ad.AnnData) else str(data)
            files = [_input(name, reader, [], tokenizer, scan, [], added)]  # no input column: results go into its obs
        elif inputs.reads_soma:
            files = [open_soma_input(config, tokenizer, scan, open_files, added)]
        else:
            files = [
                open_file_input(Path(name), config, tokenizer, scan, open_files, added) for name in inputs.data_files
            ]
        planned = task.planned_rows(sum(len(f.cells) for f in files) if files else None)
        if planned is None:
            units = plan_units([len(f.cells) for f in files], chunk_size)
        else:
            units = plan_units([planned], chunk_size, file_index=TASK_ROWS)
        if not units:
            raise ValueError(f"the input files {inputs.data_files} hold no cells")
        genes, gene_columns = gene_axis(files, len(checkpoint.gene_vocab))
        precision = config.predict.precision or default_precision(device)  # the batch loop warns about a slow one
        return Session(
            config, task, checkpoint, model, device, files, genes, gene_columns, units, precision, open_files.pop_all()
        )


def open_file_input(
    path: Path,
    config: RunConfig,
    tokenizer: CellTokenizer,
    scan: CountScanner,
    open_files: contextlib.ExitStack,
    added: Sequence[str],
) -> InputFile:
    """An input file, open (until ``open_files`` closes) and checked; ``added``: the obs columns the output adds."""
    reader = open_files.enter_context(open_counts(path, config.input.use_raw))
    stat = path.stat()
    identity = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    return _input(str(path), reader, config.output.obs_keys, tokenizer, scan, identity, added, config.input.obs_filter)


def open_soma_input(
    config: RunConfig,
    tokenizer: CellTokenizer,
    scan: CountScanner,
    open_files: contextlib.ExitStack,
    added: Sequence[str],
) -> InputFile:
    """The cells of the SOMA experiment that the run's query selects, open and checked.

    Only the obs columns that the run keeps (``obs_keys``, which go to the ``.h5ad``: none without one) and reads
    (the checkpoint's aux columns) are read.
    """
    inputs = config.input
    aux_columns = config.model.data_config.aux_cols
    if not config.output.writes_h5ad:
        obs_keys, columns = [ALL_OBS_KEYS], list(aux_columns)
    else:
        obs_keys = config.output.obs_keys
        columns = None if obs_keys == [ALL_OBS_KEYS] else [*obs_keys, *aux_columns]
    reader = SomaReader(
        inputs.soma,
        organism=inputs.organism,
        obs_filter=inputs.obs_filter,
        measurement=inputs.soma_measurement,
        x_layer=inputs.soma_x_layer,
        obs_columns=columns,
        census_version=inputs.census_version,
    )
    open_files.enter_context(reader)
    identity = [reader.experiment_uri, reader.n_obs, reader.query_sha256]
    return _input(reader.source, reader, obs_keys, tokenizer, scan, identity, added)


def _input(
    name: str,
    reader: CountReader,
    obs_keys: list[str],
    tokenizer: CellTokenizer,
    scan: CountScanner,
    identity: list,
    added: Sequence[str],
    obs_filter: str | None = None,
) -> InputFile:
    """The input ``name`` of ``reader``: its obs columns chosen, its genes matched, its counts checked (``scan``).

    ``obs_filter`` selects the cells of a file (a SOMA reader applies it when it reads obs).
    """
    obs = select_obs(reader.obs, obs_keys, name, added)
    if isinstance(reader, SomaReader):
        obs[JOINID] = reader.joinids
    cells = tokenizer.prepare(reader, scan)
    if obs_filter is not None and not isinstance(reader, SomaReader):
        cells = cells.keep_only(obs_filter_rows(reader.obs, obs_filter, name), "obs_filter")
        if not len(cells):
            raise UserError(f"{name}: {cells.describe_dropped()}; relax obs_filter or the cell filters")
    obs = obs.iloc[cells.source_rows()].copy() if cells.n_dropped else obs
    obs[SOURCE_FILE_COLUMN] = name
    return InputFile(name, cells, obs, identity)


def select_obs(obs: pd.DataFrame, keys: Sequence[str], path: Path | str, added: Sequence[str]) -> pd.DataFrame:
    """The requested obs columns (all for ``["all"]``), with the original obs_names; none may be in ``added``."""
    if list(keys) == [ALL_OBS_KEYS]:
        keys = list(obs.columns)
    missing = [k for k in keys if k not in obs.columns]
    if missing:
        raise KeyError(f"{path}: obs has no column(s) {missing} (columns: {list(obs.columns)})")
    clashing = [k for k in keys if k in added]
    if clashing:
        raise ValueError(
            f"{path}: obs column(s) {clashing} would be overwritten by the output's; choose others with obs_keys"
        )
    return obs[list(keys)].copy()


def gene_axis(files: Sequence[InputFile], vocab_size: int) -> tuple[pd.Index, np.ndarray]:
    """Genes matched in any file, in order of first appearance, and each vocabulary entry's column among them."""
    if not files:
        return pd.Index([], name="gene_id"), np.full(vocab_size, -1, dtype=np.int64)
    tokens = np.concatenate([f.cells.selection.tokens for f in files])
    ids = np.concatenate([f.cells.selection.gene_ids for f in files])
    _, first = np.unique(tokens, return_index=True)
    first = np.sort(first)
    columns = np.full(vocab_size, -1, dtype=np.int64)
    columns[tokens[first]] = np.arange(first.size)
    return pd.Index(ids[first].astype(str), name="gene_id"), columns


def plan_units(file_sizes: Sequence[int], chunk_size: int, file_index: int | None = None) -> list[WorkUnit]:
    """Cut each file's cells into units of at most ``chunk_size`` consecutive cells, in input order.

    ``file_index`` given (:data:`TASK_ROWS`), every unit has it: ``file_sizes`` are then a task's rows.
    """
    units = []
    for index, size in enumerate(file_sizes):
        for start in range(0, size, chunk_size):
            units.append(
                WorkUnit(len(units), index if file_index is None else file_index, start, min(start + chunk_size, size))
            )
    return units


def read_units(session: Session, units: Sequence[WorkUnit]) -> Iterator[tuple[WorkUnit, TokenizedCells]]:
    """Each unit with its cells, in order; ``n_data_workers`` threads read ahead while the model runs."""
    workers = session.config.hardware.n_data_workers
    if workers == 0:
        yield from ((unit, session.read_unit(unit)) for unit in units)
        return
    with ThreadPoolExecutor(workers) as pool:
        ahead = deque()
        for unit in units:
            ahead.append((unit, pool.submit(session.read_unit, unit)))
            if len(ahead) > workers:
                first, reading = ahead.popleft()
                yield first, reading.result()
        yield from ((unit, reading.result()) for unit, reading in ahead)
