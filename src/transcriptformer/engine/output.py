"""The output ``.h5ad`` of an inference run, written chunk by chunk.

Layout (``n`` cells of all input files); where each output goes is its ``anndata`` slot in
:data:`transcriptformer.model.outputs.OUTPUTS`::

    obs                 the inputs' obs (original obs_names and order), columns filtered to obs_keys,
                        plus source_file and the per-cell numbers (llh), then the task's columns
                        (transcriptformer.engine.task.Task.finish)
    obsm[key]           per-cell vectors: the (n, E) cell embeddings as obsm["X_transcriptformer"] (scanpy's
                        use_rep, cellxgene's X_<name>), with obsm["embeddings"] the same HDF5 dataset (a hard link,
                        stored once) for the original release's readers (EMBEDDING_KEY, EMBEDDING_ALIAS)
    var                 with per-gene layers: the g genes matched in any input, index their gene ids, columns the
                        inputs' var columns (each gene's row from the first file that has it), input_var_name and
                        symbol (the bundled tables' gene symbols, "" for an id they lack; an input's own symbol
                        column is kept instead); without: no genes (g = 0)
    layers[key]         per-gene numbers (mu, gene_llh): (n, g) sparse, an entry for each gene whose
                        position holds a value (transcriptformer.model.outputs.gene_positions)
    X                   the layer named by transcriptformer.model.outputs.main_matrix_key (mu first), the same
                        HDF5 object as that layer (stored once); without layers an empty (n, 0) matrix
    uns["cge_embeddings"], uns["cge_cell_indices"], uns["cge_gene_names"]
                        contextual gene embeddings, one row per (cell, gene) pair, as the original release
                        wrote them: (m, E) float32, (m,) int64 row of obs, (m,) str gene id
                        (positions in the file as written: read them before subsetting the AnnData,
                        or use :func:`contextual_embeddings`)
    uns[key]            a DataFrame of each per-cell number (uns["llh"]), as the original release wrote it
    uns["transcriptformer"]  checkpoint, versions and the run's settings

A run holds its output through :func:`claim_output`: the output's folder and name are checked before anything is
computed, and a lock file beside the output (``.<output name>.lock``) keeps a second run from writing the same
output, or its ``.parts`` folder, at the same time.

A task may write files of its own beside the output (:meth:`Task.write_files
<transcriptformer.engine.task.Task.write_files>`): they are written into a temporary folder with the output's
temporary file, and moved into place just before it, so that the output, renamed last, appears only with them; an
existing one is replaced only with ``overwrite``, as the output is.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem
from filelock import FileLock, Timeout

from transcriptformer.engine.config import EMBEDDING_ALIAS, EMBEDDING_KEY
from transcriptformer.errors import UserError
from transcriptformer.model.outputs import OUTPUTS, main_matrix_key
from transcriptformer.pipeline import GeneOutputs

# uns keys of the contextual gene embeddings, as the original release wrote them.
CGE_EMBEDDINGS, CGE_CELL_INDICES, CGE_GENE_NAMES = "cge_embeddings", "cge_cell_indices", "cge_gene_names"
GENE_ID = "gene_id"
SYMBOL = "symbol"  # var column of each gene's symbol
OBSM_KEYS = {"embeddings": EMBEDDING_KEY}  # model output -> obsm key, where they differ
TEMPORARY_SUFFIX = ".tmp.h5ad"
TEMPORARY_FOLDER_SUFFIX = ".tmp-files"  # the task's files beside the output, while it is written
# Adds columns to the output's obs once every cell's per-cell numbers are in it; returns the obs to write and uns
# entries to add (a task's finish: transcriptformer.engine.task.Task.finish).
ObsFinisher = Callable[[pd.DataFrame], tuple[pd.DataFrame, dict]]
# Writes a task's files into the folder it is given, once obs is finished (a task's write_files).
FilesWriter = Callable[[Path], None]


def row_slot(key: str, values: np.ndarray) -> str:
    """Where per-row values go: a model output's AnnData slot (``OUTPUTS``), else obs (a value a row) or obsm."""
    if key in OUTPUTS:
        return OUTPUTS[key].anndata
    return "obs" if values.ndim == 1 else "obsm"


def obsm_key_of(key: str) -> str:
    """The obsm key that the per-row output ``key`` is written under (``embeddings``: :data:`EMBEDDING_KEY`)."""
    return OBSM_KEYS.get(key, key)


def stored_obsm_key(obsm: Collection[str], key: str) -> str | None:
    """The key of ``obsm`` that holds the embeddings asked for as ``key``; ``None`` when it holds none.

    ``key`` itself when present; else, for :data:`EMBEDDING_KEY` or :data:`EMBEDDING_ALIAS`, the other of the two, so
    that files written before the cell embeddings moved to :data:`EMBEDDING_KEY` (only ``embeddings``) and after
    (or AnnData objects written by the Python API, only ``X_transcriptformer``) are read alike.
    """
    if key in obsm:
        return key
    pair = {EMBEDDING_KEY: EMBEDDING_ALIAS, EMBEDDING_ALIAS: EMBEDDING_KEY}
    return pair[key] if key in pair and pair[key] in obsm else None


def concat_frames(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Stack the obs (or var) of several files (original index, all columns), in a form that ``.h5ad`` can store.

    A column that some files lack is missing (NaN) for their rows. Columns that become mixed in the stacking
    are converted without losing values: booleans with gaps to pandas' nullable ``boolean``, other mixtures of
    types to strings.
    """
    stacked = pd.concat(frames)
    for column in stacked.columns:
        if stacked[column].dtype == object:
            stacked[column] = _writable(stacked[column])
    return stacked


def _writable(values: pd.Series) -> pd.Series:
    present = values.dropna()
    if present.map(lambda v: isinstance(v, bool | np.bool_)).all():
        return values.astype("boolean")
    if present.map(lambda v: isinstance(v, str)).all():
        return values
    return values.where(values.isna(), values.astype(str))


def concat_var(frames: Sequence[pd.DataFrame], genes: pd.Index) -> pd.DataFrame:
    """The var of the gene axis ``genes``, every column of ``frames``: each gene's first value among the files.

    ``frames`` are the input files' var rows indexed by gene id; a gene's value of a column is missing only when
    no file that has the gene has it. The index is named ``gene_id``, unless an input has a column of that name
    (which then keeps its values).
    """
    var = concat_frames(frames).groupby(level=0, sort=False).first().reindex(genes)
    return var.rename_axis(None if GENE_ID in var.columns else GENE_ID)


def with_symbols(var: pd.DataFrame) -> pd.DataFrame:
    """``var`` (index gene ids) with each gene's symbol in column ``symbol``, unless it has that column already.

    Symbols come from the bundled human and mouse tables (:func:`~transcriptformer.data.gene_symbols.symbols_by_id`);
    ``""`` for an id they lack (another species, a special token).
    """
    from transcriptformer.data.gene_symbols import symbols_by_id

    if SYMBOL in var.columns:
        return var
    table = symbols_by_id()
    return var.assign(**{SYMBOL: [table.get(str(gene), "") for gene in var.index]})


def lock_file_of(path: Path) -> Path:
    """The lock file of the output ``path``: ``.<name>.lock`` beside it (empty; it stays when the run ends)."""
    return path.with_name(f".{path.name}.lock")


# The signals that stop a run, held while an output and its files are moved into place.
TERMINATION = (signal.SIGTERM, signal.SIGINT)


def temporary_file_of(path: Path, pid: int) -> Path:
    """Where process ``pid`` writes the output ``path`` before renaming it into place."""
    return path.with_name(f".{path.stem}.{pid}{TEMPORARY_SUFFIX}")


def temporary_folder_of(path: Path, pid: int) -> Path:
    """Where process ``pid`` writes the task's files beside the output ``path`` before moving them into place."""
    return path.with_name(f".{path.stem}.{pid}{TEMPORARY_FOLDER_SUFFIX}")


def refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    """Raise ``FileExistsError`` naming the first of ``paths`` that exists, unless ``overwrite``."""
    existing = [path for path in paths if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass `overwrite=True` to replace it")


@contextmanager
def claim_output(
    path: Path, overwrite: bool = False, writes: bool = True, beside: Sequence[str] = ()
) -> Iterator[None]:
    """Hold the output ``path`` (and the ``.parts`` folder beside it) for the duration of the block.

    Before anything is computed: creates the output folder, checks that it can be written and that ``path`` is not
    a folder, takes the output's lock (:func:`hold_output`), and refuses an existing output unless ``overwrite`` (or
    unless the run ``writes`` no ``.h5ad``, and holds ``path`` only for its ``.parts`` folder), as it refuses the
    files of the names ``beside`` that the task writes next to it.

    Raises
    ------
    UserError
        The folder is a file or cannot be written, the output is a folder, or another run holds the output.
    FileExistsError
        The output exists and ``overwrite`` is off.
    """
    if path.is_dir():
        raise UserError(f"the output {path} is a folder, not a file; choose another output_filename")
    with hold_output(path, ("output_path", "output_filename")):
        if writes:
            refuse_existing([path, *(path.with_name(name) for name in beside)], overwrite)
        yield


@contextmanager
def hold_output(path: Path, settings: tuple[str, ...]) -> Iterator[None]:
    """Create the folder of the output ``path`` and hold the output's lock for the duration of the block.

    The lock (``.<name>.lock`` beside ``path``) is released when the block ends or the process dies. Errors name
    ``settings``, which choose the output's place (the first, its folder).

    Raises
    ------
    UserError
        The folder is a file or cannot be written, or another run holds the output.
    """
    folder, folder_setting = path.parent, settings[0]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next(p for p in (folder, *folder.parents) if p.exists())
        raise UserError(
            f"{folder_setting} {folder} is not a folder: {blocking} is a file; give a folder (missing ones are created)"
        ) from None
    except OSError as error:
        raise _unwritable(f"create {folder}", error, folder_setting) from error
    lock_file = lock_file_of(path)
    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = lock_holder(lock_file)
        raise UserError(
            f"{path} is being written by another run{f' (pid {holder})' if holder else ''}, which holds {lock_file}; "
            f"wait for it to end, or choose another {' or '.join(settings)}"
        ) from None
    except OSError as error:
        raise _unwritable(f"write in {folder}", error, folder_setting) from error
    try:
        yield
    finally:
        lock.release()


def _unwritable(action: str, error: OSError, folder_setting: str) -> UserError:
    return UserError(f"cannot {action} ({error.strerror or error}); choose a writable {folder_setting}")


def lock_holder(lock_file: Path) -> int | None:
    """The process that holds a lock on ``lock_file``, from Linux's ``/proc/locks``; ``None`` when not known."""
    try:
        stat = lock_file.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    for line in table.splitlines():  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; waiters' lines hold "->"
        fields = line.split()
        if "->" not in fields and len(fields) > 5 and fields[5] == device and fields[4] != "0":
            return int(fields[4])
    return None


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files (and folders of a task's files) that runs killed while writing ``path`` left behind.

    Call it only while holding the output (:func:`claim_output`): no other run is writing it then.
    """
    prefix = f".{path.stem}."
    stale = [
        p
        for p in path.parent.iterdir()
        for suffix in (TEMPORARY_SUFFIX, TEMPORARY_FOLDER_SUFFIX)
        if p.name.startswith(prefix) and p.name.endswith(suffix) and p.name[len(prefix) : -len(suffix)].isdigit()
    ]
    for temporary in stale:
        shutil.rmtree(temporary) if temporary.is_dir() else temporary.unlink(missing_ok=True)
    return stale


def write_output(
    path: Path,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    chunks: Iterable[GeneOutputs],
    metadata: dict,
    overwrite: bool = False,
    finish_obs: ObsFinisher | None = None,
    main_layer: Callable[[Collection[str]], str | None] = main_matrix_key,
    files: tuple[Sequence[str], FilesWriter] | None = None,
) -> None:
    """Write the output ``.h5ad`` (layout in the module docstring) from chunks of consecutive cells.

    Each chunk goes to disk before the next is read, so memory holds one chunk's outputs (plus the small
    per-cell ``llh``) whatever the number of cells. The file is written under a temporary name and renamed
    into place: an existing ``path`` is kept unless ``overwrite``, and an interrupted or failed write (a full
    disk) leaves no output and an existing one as it was: it raises the ``OSError`` of the failed write.

    Parameters
    ----------
    path
        The output file.
    obs
        One row per cell, in output order.
    var
        One row per gene of the gene axis, index gene ids (:func:`concat_var`); written as var when the chunks hold
        per-gene layers, and naming the genes of contextual gene embeddings.
    chunks
        The outputs of all cells, in order.
    metadata
        Stored as ``uns["transcriptformer"]``.
    finish_obs
        Columns computed from all cells' per-cell numbers, written with them in the one atomic write.
    main_layer
        The per-gene layer that ``X`` holds, given the layers' keys (``None``: the first per-gene array, if any).
    files
        The names of a task's files beside the output, and what writes them into a folder (after ``finish_obs``):
        they are moved into place just before the output, each replacing an existing file only with ``overwrite``.
    """
    names, write_files = files or ((), None)
    beside = [path.with_name(name) for name in names]
    refuse_existing([path, *beside], overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_file_of(path, os.getpid())
    folder = temporary_folder_of(path, os.getpid())
    try:
        with _DeferredFailureFile(temporary) as raw:
            try:
                with h5py.File(raw, "w") as f:
                    writer = _OutputWriter(f, len(obs), var)
                    for chunk in chunks:
                        writer.append(chunk)
                        raw.raise_failure()
                    writer.finish(obs, metadata, finish_obs, main_layer)
            except Exception:
                raw.raise_failure()  # what made HDF5 fail, if a write did
                raise
            raw.raise_failure()  # the writes of closing
        if write_files is not None:
            folder.mkdir()
            write_files(folder)
        put_in_place(temporary, path, folder if write_files is not None else None, beside)
    finally:
        temporary.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


def put_in_place(temporary: Path, path: Path, folder: Path | None, beside: Sequence[Path]) -> None:
    """Move the task's files of ``folder`` to ``beside``, then the output ``temporary`` to ``path``, as one step.

    SIGTERM and SIGINT wait until every file is in place (:func:`termination_deferred`), so that a run stopped then
    leaves the previous output and its files, or the new ones: never the new files beside the previous output.
    """
    with termination_deferred():
        if folder is not None:
            move_files(folder, beside)
        os.replace(temporary, path)


@contextmanager
def termination_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT for the block (a few renames), then act on one that came, as it would have.

    Only the main thread can set signal handlers; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    handlers = {number: signal.signal(number, lambda n, _: received.append(n)) for number in TERMINATION}
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        if received:
            signal.raise_signal(received[0])


def move_files(folder: Path, targets: Sequence[Path]) -> None:
    """Move the files of ``folder`` to ``targets`` (same names); a file of another name is a task's defect."""
    written = sorted(p.name for p in folder.iterdir())
    if written != sorted(t.name for t in targets):
        raise ValueError(f"the task wrote {written} beside the output, and declared {[t.name for t in targets]}")
    for target in targets:
        os.replace(folder / target.name, target)


def write_anndata(adata: ad.AnnData, path: Path, files: tuple[Sequence[str], FilesWriter] | None = None) -> None:
    """Write ``adata`` to ``path`` under a temporary name, then rename it into place (no half-written file).

    Hold the output with :func:`claim_output` around it. ``files``: the names of files beside the output and what
    writes them into a folder, moved into place just before the output, as :func:`write_output` does.
    """
    names, write_files = files or ((), None)
    temporary = temporary_file_of(path, os.getpid())
    folder = temporary_folder_of(path, os.getpid())
    try:
        adata.write_h5ad(temporary)
        if write_files is not None:
            folder.mkdir()
            write_files(folder)
        put_in_place(temporary, path, folder if write_files is not None else None, [path.with_name(n) for n in names])
    finally:
        temporary.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


class _DeferredFailureFile(io.FileIO):
    """The file HDF5 writes the output to (h5py's ``fileobj`` driver), which keeps a failed write from HDF5.

    HDF5 cannot recover from a failed write (a full disk): the objects it closes later write again, fail again,
    and the library crashes the interpreter (h5py issue 914). This file records the first failure instead, and goes
    on in memory: the writes that follow are kept there and reads see them, so HDF5 finds a consistent file and
    closes it; the writer raises the failure at the next chunk (:meth:`raise_failure`) and deletes the file. Memory
    holds what is written after the failure, at most about one chunk's outputs.
    """

    def __init__(self, path: Path):
        super().__init__(path, "w+")
        self.failure: OSError | None = None
        self._kept: list[tuple[int, bytes]] = []  # (offset, bytes) written after the failure

    def write(self, data) -> int:
        """Write all of ``data`` (the driver ignores short writes); after a failure, into memory."""
        view = memoryview(data).cast("B")
        try:
            while view and self.failure is None:
                view = view[super().write(view) :]
        except OSError as error:
            self.failure = error
        if view:
            self._kept.append((self.tell(), bytes(view)))
            self.seek(len(view), io.SEEK_CUR)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        """Read ``size`` bytes, with what was written in memory after a failure."""
        if self.failure is None or size < 0:
            return super().read(size)
        start = self.tell()
        data = bytearray(super().read(size).ljust(size, b"\0"))
        for offset, kept in self._kept:
            low, high = max(offset, start), min(offset + len(kept), start + size)
            if low < high:
                data[low - start : high - start] = kept[low - offset : high - offset]
        self.seek(start + size)
        return bytes(data)

    def truncate(self, size: int | None = None) -> int:
        """Resize the file; after a failure, nothing to do (the file is deleted)."""
        if self.failure is None:
            try:
                return super().truncate(size)
            except OSError as error:
                self.failure = error
        return self.tell() if size is None else size

    def raise_failure(self) -> None:
        """Raise the failure of a write, if one failed."""
        if self.failure is not None:
            raise self.failure


def _as_written_by_anndata(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with string columns made categorical (missing values included), as ``AnnData.write_h5ad`` does."""
    holder = ad.AnnData(obs=frame)
    holder.strings_to_categoricals()
    return holder.obs


class _OutputWriter:
    """Appends chunks of outputs to an open ``.h5ad`` file in AnnData's on-disk format."""

    def __init__(self, file: h5py.File, n_cells: int, var: pd.DataFrame):
        self.file, self.n_cells, self.var = file, n_cells, var
        self.gene_ids = var.index.to_numpy(dtype=object)
        self.written = 0
        self.layer_order: list[str] = []  # per-gene keys in the order the chunks bring them
        self.obs_values: dict[str, list[np.ndarray]] = {}
        for group in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(file, group, {})

    def append(self, chunk: GeneOutputs) -> None:
        """Write the outputs of the next ``chunk.n_cells`` cells."""
        rows = slice(self.written, self.written + chunk.n_cells)
        if rows.stop > self.n_cells:
            raise ValueError(f"more cells of outputs than the {self.n_cells} rows of obs")
        for key, values in chunk.cell_values.items():
            if row_slot(key, values) == "obs":
                self.obs_values.setdefault(key, []).append(values)
            else:
                obsm, name = self.file["obsm"], obsm_key_of(key)
                self._dataset(obsm, name, (self.n_cells, *values.shape[1:]), values.dtype)[rows] = values
        for key, matrix in chunk.gene_values.items():
            if key in self.file["layers"]:
                sparse_dataset(self.file["layers"][key]).append(matrix)
            else:
                write_elem(self.file["layers"], key, matrix)
                self.layer_order.append(key)
        if chunk.cge:
            self._extend(CGE_EMBEDDINGS, chunk.cge["embeddings"])
            self._extend(CGE_CELL_INDICES, chunk.cge["cell_index"].astype(np.int64) + self.written)
            self._extend(CGE_GENE_NAMES, self.gene_ids[chunk.cge["gene_index"]])
        self.written = rows.stop

    def finish(
        self,
        obs: pd.DataFrame,
        metadata: dict,
        finish_obs: ObsFinisher | None = None,
        main_layer: Callable[[Collection[str]], str | None] = main_matrix_key,
    ) -> None:
        """Write obs (per-cell numbers, then the columns of ``finish_obs``), var, X and uns once every chunk is in."""
        if self.written != self.n_cells:
            raise ValueError(f"{self.written} cells of outputs for {self.n_cells} rows of obs")
        obs = obs.copy()
        for key, values in self.obs_values.items():
            obs[key] = np.concatenate(values)
            write_elem(self.file["uns"], key, pd.DataFrame({key: obs[key].to_numpy()}, index=obs.index.astype(str)))
        if finish_obs is not None:
            obs, uns = finish_obs(obs)
            for key, value in uns.items():
                write_elem(self.file["uns"], key, value)
        write_elem(self.file, "obs", _as_written_by_anndata(obs))
        # the task's choice (a model output by MAIN_MATRIX_ORDER by default), else a task's first per-gene array
        main_matrix = main_layer(self.layer_order) or next(iter(self.layer_order), None)
        if main_matrix is None:  # no per-gene layer: no genes, and X an empty matrix
            write_elem(self.file, "var", pd.DataFrame(index=self.var.index[:0]))
            write_elem(self.file, "X", sp.csr_matrix((self.n_cells, 0), dtype=np.float32))
        else:
            write_elem(self.file, "var", _as_written_by_anndata(self.var))
            self.file["X"] = self.file["layers"][main_matrix]  # a hard link: the layer is stored once
        if EMBEDDING_KEY in self.file["obsm"] and EMBEDDING_ALIAS not in self.file["obsm"]:
            self.file["obsm"][EMBEDDING_ALIAS] = self.file["obsm"][EMBEDDING_KEY]  # a hard link: stored once
        write_elem(self.file["uns"], "transcriptformer", metadata)
        self.file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})

    def _extend(self, key: str, values: np.ndarray) -> None:
        """Append rows to the array ``uns[key]``, created on first use."""
        dataset = self._dataset(self.file["uns"], key, (0, *values.shape[1:]), values.dtype, growing=True)
        start = dataset.shape[0]
        dataset.resize(start + len(values), axis=0)
        dataset[start:] = values

    @staticmethod
    def _dataset(group: h5py.Group, key: str, shape: tuple, dtype, growing: bool = False) -> h5py.Dataset:
        """The array ``key`` of ``group``, created (AnnData-encoded) on first use; strings as AnnData writes them."""
        if key not in group:
            strings = np.dtype(dtype).kind == "O"
            maxshape = (None, *shape[1:]) if growing else None
            group.create_dataset(
                key,
                shape=shape,
                dtype=h5py.string_dtype() if strings else dtype,
                maxshape=maxshape,
                chunks=True if growing else None,
            )
            group[key].attrs.update(
                {"encoding-type": "string-array" if strings else "array", "encoding-version": "0.2.0"}
            )
        return group[key]


def contextual_embeddings(adata: ad.AnnData, gene_id: str) -> tuple[pd.Index, np.ndarray]:
    """Every contextual embedding of one gene in an inference output.

    Parameters
    ----------
    adata
        An output file as read from disk (``uns["cge_cell_indices"]`` indexes its cells as written).
    gene_id
        A gene id, as in ``uns["cge_gene_names"]``.

    Returns
    -------
    cells, embeddings
        The names of the cells whose sequence holds the gene, and its ``(len(cells), E)`` embeddings in them.
    """
    if CGE_EMBEDDINGS not in adata.uns:
        raise KeyError("this output has no contextual gene embeddings; run inference with `emb_type=cge`")
    rows = adata.uns[CGE_GENE_NAMES] == gene_id
    if not rows.any():
        examples = list(pd.unique(adata.uns[CGE_GENE_NAMES])[:3])
        raise KeyError(f"no cell's sequence in this output holds gene {gene_id!r} (its gene ids are like {examples})")
    return adata.obs_names[adata.uns[CGE_CELL_INDICES][rows]], adata.uns[CGE_EMBEDDINGS][rows]
