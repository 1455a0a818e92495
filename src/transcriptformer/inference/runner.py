"""Run a checkpoint over cell files and write one ``.h5ad``: the engine of ``transcriptformer inference``.

Each process (one, or one per GPU, see :mod:`~transcriptformer.inference.distributed`):

1. :func:`prepare` loads the checkpoint with the run's settings, swaps in other gene embeddings when asked
   (:mod:`transcriptformer.ood`), opens every input file for row-block reading, matches its genes with the
   vocabulary, and cuts its cells into work units of ``chunk_size`` consecutive cells.
2. :func:`process_units` runs this process' units (unit ``k`` goes to process ``k mod N``): it reads the unit's
   cells, runs them in length-aware batches (:meth:`TranscriptFormerModel.iter_batches`), and saves the unit's
   outputs under ``.<output name>.parts/`` as soon as the unit is done.
3. Rank 0 merges the units in input order, writes the ``.h5ad`` atomically and prints a summary.

A cell's outputs depend on the cell alone: not on its batch mates, the batch size, or which process ran it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from transcriptformer import __version__
from transcriptformer.api import TranscriptFormerModel, resolve_device
from transcriptformer.checkpoint import WEIGHTS_FILE, load_checkpoint
from transcriptformer.data.sources import open_counts
from transcriptformer.data.tokenize import PreparedCells, TokenizedCells
from transcriptformer.inference import distributed
from transcriptformer.inference.config import ALL_OBS_KEYS, RunConfig
from transcriptformer.inference.distributed import Rank
from transcriptformer.inference.output import ChunkOutputs, concat_obs, write_output
from transcriptformer.ood import swap_gene_embeddings

CELL_KEYS = ("embeddings", "llh")
# Arrays that iter_batches adds to the model outputs; only gene_token_indices is needed here.
INPUT_KEYS = ("gene_token_indices", "gene_counts", "aux_token_indices")
# obs columns the output adds; an input column of the same name would be lost, so it is an error.
ADDED_OBS_COLUMNS = ("source_file", "llh")


@dataclass
class InputFile:
    """One input file, open for row-block reading.

    Attributes
    ----------
    path : Path
    cells : PreparedCells
        Its genes matched with the vocabulary; counts are read per unit.
    obs : DataFrame
        The file's obs, filtered to the requested columns, with ``source_file``.
    """

    path: Path
    cells: PreparedCells
    obs: pd.DataFrame

    @property
    def n_genes(self) -> int:
        """Genes (columns) of the file's count matrix, before matching the vocabulary."""
        return len(self.cells.reader.var)

    @property
    def n_matched(self) -> int:
        """Genes of the file that the vocabulary holds."""
        return len(self.cells.selection.columns)


@dataclass(frozen=True)
class WorkUnit:
    """Consecutive cells ``start:stop`` of one input file; outputs are saved per unit."""

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
    model : TranscriptFormerModel
    files : list of InputFile
    genes : Index
        Gene axis of the per-gene outputs: every matched gene, in order of first appearance.
    gene_columns : ndarray
        ``(vocab_size,)`` column of each vocabulary entry on the gene axis, ``-1`` when absent.
    units : list of WorkUnit
    precision : str
    """

    config: RunConfig
    model: TranscriptFormerModel
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
        return sha256_of(Path(self.config.model.checkpoint_path) / WEIGHTS_FILE)

    @property
    def parts_dir(self) -> Path:
        """Where units' outputs wait to be merged."""
        return self.output_file.with_name(f".{self.output_file.name}.parts")

    def part_file(self, unit: WorkUnit) -> Path:
        """The saved outputs of one unit."""
        return self.parts_dir / f"unit-{unit.index:06d}.npz"

    def read_unit(self, unit: WorkUnit) -> TokenizedCells:
        """The tokenized cells of one unit, read from its file."""
        return self.files[unit.file_index].cells.cells(unit.start, unit.stop)


def output_file_of(config: RunConfig) -> Path:
    """``output_path / output_filename``, with ``.h5ad`` appended when missing."""
    name = config.inference.output_filename
    return Path(config.inference.output_path) / (name if name.endswith(".h5ad") else f"{name}.h5ad")


def check_output_free(config: RunConfig) -> None:
    """Fail early when the output exists and may not be replaced."""
    path = output_file_of(config)
    if path.exists() and not config.inference.overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``None`` means ``16-mixed`` on CUDA and ``32`` elsewhere."""
    return precision or ("16-mixed" if device.type == "cuda" else "32")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for ``16-mixed`` and ``bf16-mixed``; nothing for ``32``."""
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "16-mixed" else torch.bfloat16)


def prepare(config: RunConfig, device: torch.device) -> Session:
    """Load the model, open the inputs and plan the work units; reads no counts and writes nothing."""
    inference, data = config.inference, config.model.data_config
    if not inference.data_files:
        raise ValueError("no input file: give one or more with --data-file")
    check_output_free(config)
    checkpoint = load_checkpoint(
        config.model.checkpoint_path,
        device,
        inference.attention_backend,
        config=config.checkpoint_config,
        adapter=inference.adapter,
    )
    if inference.pretrained_embedding:
        checkpoint = swap_gene_embeddings(checkpoint, inference.pretrained_embedding)
    model = TranscriptFormerModel(checkpoint, device)
    tokenizer = model.cell_tokenizer(
        clip_counts=data.clip_counts,
        filter_to_vocab=data.filter_to_vocabs,
        remove_duplicate_genes=inference.remove_duplicate_genes,
    )
    with contextlib.ExitStack() as open_files:
        files = []
        for name in inference.data_files:
            path = Path(name)
            reader = open_files.enter_context(open_counts(path, inference.use_raw))
            obs = select_obs(reader.obs, inference.obs_keys, path)
            obs["source_file"] = str(path)
            files.append(InputFile(path, tokenizer.prepare(reader), obs))
        units = plan_units([len(f.cells) for f in files], inference.chunk_size)
        if not units:
            raise ValueError(f"the input files {inference.data_files} hold no cells")
        genes, gene_columns = gene_axis(files, len(checkpoint.gene_vocab))
        precision = resolve_precision(inference.precision, device)
        return Session(config, model, files, genes, gene_columns, units, precision, open_files.pop_all())


def select_obs(obs: pd.DataFrame, keys: Sequence[str], path: Path) -> pd.DataFrame:
    """The requested obs columns (all for ``["all"]``), with the original obs_names."""
    if list(keys) == [ALL_OBS_KEYS]:
        keys = list(obs.columns)
    missing = [k for k in keys if k not in obs.columns]
    if missing:
        raise KeyError(f"{path}: obs has no column(s) {missing} (columns: {list(obs.columns)})")
    clashing = [k for k in keys if k in ADDED_OBS_COLUMNS]
    if clashing:
        raise ValueError(
            f"{path}: obs column(s) {clashing} would be overwritten by the output's; choose others with --obs-keys"
        )
    return obs[list(keys)].copy()


def gene_axis(files: Sequence[InputFile], vocab_size: int) -> tuple[pd.Index, np.ndarray]:
    """Genes matched in any file, in order of first appearance, and each vocabulary entry's column among them."""
    tokens = np.concatenate([f.cells.selection.tokens for f in files])
    ids = np.concatenate([f.cells.selection.gene_ids for f in files])
    _, first = np.unique(tokens, return_index=True)
    first = np.sort(first)
    columns = np.full(vocab_size, -1, dtype=np.int64)
    columns[tokens[first]] = np.arange(first.size)
    return pd.Index(ids[first].astype(str), name="gene_id"), columns


def plan_units(file_sizes: Sequence[int], chunk_size: int) -> list[WorkUnit]:
    """Cut each file's cells into units of at most ``chunk_size`` consecutive cells, in input order."""
    units = []
    for file_index, size in enumerate(file_sizes):
        for start in range(0, size, chunk_size):
            units.append(WorkUnit(len(units), file_index, start, min(start + chunk_size, size)))
    return units


def read_units(session: Session, units: Sequence[WorkUnit]) -> Iterator[tuple[WorkUnit, TokenizedCells]]:
    """Each unit with its cells, in order; ``n_data_workers`` threads read ahead while the model runs."""
    workers = session.config.inference.n_data_workers
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


def esm2ce_batches(
    model: TranscriptFormerModel, cells: TokenizedCells, batch_size: int, max_tokens: int | None
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """The ``esm2ce`` baseline: the mean of the frozen gene-embedding rows of each cell's genes, no transformer.

    Batched and yielded like :meth:`TranscriptFormerModel.iter_batches`.
    """
    pad = model.model.special_tokens.pad
    for planned in model.batch_plan(cells, batch_size=batch_size, max_tokens=max_tokens):
        tokens = cells.batch(planned.rows, planned.length).gene_tokens
        on_device = tokens.to(model.device)
        rows = model.model.gene_embeddings.embedding(on_device)
        valid = (on_device != pad)[..., None]
        embeddings = (rows * valid).sum(1) / valid.sum(1).clamp(min=1)
        yield planned.rows, {"embeddings": embeddings.float().cpu().numpy(), "gene_token_indices": tokens.numpy()}


def predict_unit(session: Session, cells: TokenizedCells, bar: tqdm) -> ChunkOutputs:
    """Run one unit's cells batch by batch; their outputs, in the unit's cell order."""
    inference, model = session.config.inference, session.model
    if session.config.model.model_type == "esm2ce":
        batches = esm2ce_batches(model, cells, inference.batch_size, inference.max_tokens)
    else:
        batches = model.iter_batches(
            cells,
            batch_size=inference.batch_size,
            max_tokens=inference.max_tokens,
            output_keys=inference.wanted_outputs,
        )
    rows, outputs = [], []
    with torch.no_grad(), autocast(model.device, session.precision):
        for batch_rows, batch_outputs in batches:
            rows.append(batch_rows)
            outputs.append(key_by_gene(session, batch_outputs))
            bar.update(len(batch_rows))
    return ChunkOutputs.concat(outputs).take(np.argsort(np.concatenate(rows)))


def key_by_gene(session: Session, outputs: dict[str, np.ndarray]) -> ChunkOutputs:
    """Turn one batch's per-position outputs into per-gene ones (columns of the session's gene axis)."""
    network = session.model.model
    tokens = outputs["gene_token_indices"]
    is_gene = tokens != network.special_tokens.pad
    # The gene-id head scores the last position of a full-length cell against [END], not against its gene.
    scores_its_gene = np.arange(tokens.shape[1]) != network.model_config.seq_len - 1
    results = {k: v.astype(np.float32) for k, v in outputs.items() if k not in INPUT_KEYS}
    return ChunkOutputs.from_positions(
        cell_values={k: v for k, v in results.items() if k in CELL_KEYS},
        position_values={k: v for k, v in results.items() if k not in CELL_KEYS},
        columns=session.gene_columns[tokens],
        scored={"mu": is_gene, "cge": is_gene, "gene_llh": is_gene & scores_its_gene},
        n_genes=len(session.genes),
    )


# Settings that change how a run is carried out but not its results; a resumed run may change them.
RESUMABLE_CHANGES = ("overwrite", "resume", "n_data_workers", "num_gpus")


def run_fingerprint(session: Session) -> str:
    """Identifies what a run computes: its settings, its inputs (path, size, mtime) and the weights."""
    settings = session.config.to_dict()
    for key in RESUMABLE_CHANGES:
        settings["model"]["inference_config"].pop(key)
    inputs = [(str(f.path.resolve()), f.path.stat().st_size, f.path.stat().st_mtime_ns) for f in session.files]
    described = json.dumps(
        {"settings": settings, "inputs": inputs, "weights": session.weights_sha256}, sort_keys=True, default=str
    )
    return hashlib.sha256(described.encode()).hexdigest()


def open_parts_dir(session: Session) -> None:
    """Start the directory of unit outputs afresh, or check that it belongs to the run being resumed."""
    manifest = session.parts_dir / "run.json"
    fingerprint = run_fingerprint(session)
    if session.config.inference.resume and manifest.exists():
        if json.loads(manifest.read_text())["fingerprint"] != fingerprint:
            raise ValueError(
                f"the interrupted run in {session.parts_dir} had other settings, inputs or weights; "
                "run without --resume to start over"
            )
        return
    shutil.rmtree(session.parts_dir, ignore_errors=True)
    session.parts_dir.mkdir(parents=True)
    manifest.write_text(json.dumps({"fingerprint": fingerprint}))


def process_units(session: Session, units: Sequence[WorkUnit], rank: Rank) -> None:
    """Run ``units`` and save each one's outputs, in input order of its cells, as soon as it is done.

    With ``resume``, units whose outputs are already saved are skipped.
    """
    if session.config.inference.resume:
        units = [unit for unit in units if not session.part_file(unit).exists()]
    n_cells = sum(unit.stop - unit.start for unit in units)
    description = f"rank {rank.rank}" if rank.world_size > 1 else "inference"
    with tqdm(total=n_cells, unit="cell", desc=description, position=rank.rank, disable=None, delay=1) as bar:
        for unit, cells in read_units(session, units):
            predict_unit(session, cells, bar).save(session.part_file(unit))


def merge_and_write(session: Session, world_size: int) -> None:
    """Merge every unit's outputs in input order into the output file, one unit in memory at a time."""
    obs = concat_obs([f.obs for f in session.files])
    obs["source_file"] = pd.Categorical(obs["source_file"], categories=[str(f.path) for f in session.files])
    chunks = (ChunkOutputs.load(session.part_file(unit)) for unit in session.units)
    metadata = run_metadata(session, world_size)
    write_output(session.output_file, obs, session.genes, chunks, metadata, session.config.inference.overwrite)


def run_metadata(session: Session, world_size: int) -> dict:
    """``uns["transcriptformer"]``: checkpoint, versions, and the run's settings."""
    checkpoint = Path(session.config.model.checkpoint_path).resolve()
    metadata = {
        "package_version": __version__,
        "torch_version": str(torch.__version__),
        "anndata_version": importlib.metadata.version("anndata"),
        "checkpoint_path": str(checkpoint),
        "weights_sha256": session.weights_sha256,
        "model_type": session.config.model.model_type,
        "device": session.model.device.type,
        "processes": world_size,
        "precision": session.precision,
        "data_files": [str(f.path) for f in session.files],
        "genes_in_file": np.array([f.n_genes for f in session.files]),
        "genes_matched": np.array([f.n_matched for f in session.files]),
        "config": json.dumps(session.config.to_dict()),
    }
    if session.config.inference.pretrained_embedding:
        metadata["pretrained_embedding"] = list(session.config.inference.pretrained_embedding)
    if session.config.inference.adapter:
        metadata["adapter"] = str(Path(session.config.inference.adapter).resolve())
    return metadata


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def processes(count: int) -> str:
    """``"1 process"``, ``"2 processes"``."""
    return f"{count} process" + ("es" if count > 1 else "")


def describe_inputs(session: Session) -> list[str]:
    """One line per input file: cells and genes matched."""
    return [
        f"  {f.path}: {len(f.cells)} cells, {f.n_matched} of {f.n_genes} genes in the vocabulary" for f in session.files
    ]


def count_batches(session: Session) -> int:
    """Forward passes the run will make (reads every unit's counts for their lengths)."""
    inference = session.config.inference
    return sum(
        len(
            session.model.batch_plan(
                session.read_unit(u), batch_size=inference.batch_size, max_tokens=inference.max_tokens
            )
        )
        for u in session.units
    )


def format_plan(session: Session, world_size: int) -> str:
    """What a run would do (``--dry-run``)."""
    inference = session.config.inference
    n_batches = count_batches(session)
    per_batch = (
        f"of at most {inference.max_tokens} tokens"
        if inference.max_tokens
        else f"of up to {inference.batch_size} cells"
    )
    vocab = session.model.checkpoint.gene_vocab
    lines = [
        "Dry run: nothing is written.",
        f"Checkpoint: {session.config.model.checkpoint_path} ({session.config.model.model_type}, "
        f"{len(vocab)} vocabulary entries"
        + (f", gene embeddings from {inference.pretrained_embedding})" if inference.pretrained_embedding else ")"),
        "Inputs:",
        *describe_inputs(session),
        f"Plan: {session.n_cells} cells in {n_batches} batches {per_batch}, "
        f"{len(session.units)} unit(s) of up to {inference.chunk_size} cells",
        f"Device: {session.model.device.type} ({processes(world_size)}), precision {session.precision}",
        f"Outputs: {', '.join(inference.wanted_outputs)}",
        f"Output file: {session.output_file}" + (" (will be replaced)" if session.output_file.exists() else ""),
    ]
    return "\n".join(lines)


def format_summary(session: Session, world_size: int, seconds: float) -> str:
    """What a finished run did, and how to open its output."""
    path = session.output_file.resolve()
    return "\n".join(
        [
            "Inference finished.",
            *describe_inputs(session),
            f"{session.n_cells} cells in {seconds:.1f} s ({session.n_cells / seconds:.1f} cells/s) on "
            f"{session.model.device.type} ({processes(world_size)}), precision {session.precision}",
            f"Output: {path}",
            f'Open it with: adata = anndata.read_h5ad("{path}"); sc.pp.neighbors(adata, use_rep="embeddings")',
        ]
    )


def run_worker(rank: Rank, init_method: str | None, config: RunConfig, started: float) -> None:
    """Everything one process does: prepare, run its units, and (rank 0) merge, write and report.

    ``started`` is the run's start (``time.time()``), for the summary.
    """
    device = distributed.device_of(rank, resolve_device(config.inference.device))
    distributed.share_cpu_threads(rank, device)
    with distributed.process_group(rank, init_method), prepare(config, device) as session:
        if rank.is_main:
            print(
                f"Running {session.n_cells} cells from {len(session.files)} file(s) on {device.type} "
                f"({processes(rank.world_size)}), precision {session.precision}",
                flush=True,
            )
        if rank.is_main:
            open_parts_dir(session)
            done = sum(session.part_file(unit).exists() for unit in session.units)
            if done:
                print(f"Resuming: {done} of {len(session.units)} units were already done", flush=True)
        distributed.barrier(rank)
        try:
            process_units(session, session.units[rank.rank :: rank.world_size], rank)
            distributed.barrier(rank)
        except BaseException:
            if rank.is_main:
                print(f"Interrupted: finished units are kept in {session.parts_dir}; rerun with --resume", flush=True)
            raise
        if rank.is_main:
            merge_and_write(session, rank.world_size)
            shutil.rmtree(session.parts_dir)
            print(format_summary(session, rank.world_size, time.time() - started), flush=True)


def run_inference(config: RunConfig, *, dry_run: bool = False) -> Path:
    """Run inference as configured and return the output file's path.

    Parameters
    ----------
    config
        Every setting; see :class:`~transcriptformer.inference.config.RunConfig`.
    dry_run
        Check the checkpoint, the inputs and their overlap with the vocabulary, print the plan, write nothing.

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
    elif launched:
        run_worker(launched, "env://", config, started)
    elif world_size > 1:
        check_output_free(config)
        distributed.spawn(run_worker, world_size, config, started)
    else:
        run_worker(Rank(), None, config, started)
    return output_file_of(config)
