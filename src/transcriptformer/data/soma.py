"""Cells of a TileDB-SOMA experiment, read in row blocks: a local one, one at ``s3://``, or the CELLxGENE Census.

A :class:`SomaReader` is a :class:`~transcriptformer.data.sources.CountReader` over one query: the cells of an
experiment that a SOMA value filter selects (all of them without a filter), in ascending ``soma_joinid`` order.
``rows(start, stop)`` reads those cells' counts from one X layer of one measurement with tiledbsoma, and
``read_obs(start, stop)`` their obs (the requested columns and ``soma_joinid``), so memory holds a few blocks of
cells whatever the size of the query: nothing is kept per cell of the query. The measurement's var is read when it
opens, and the query's joinids are streamed once (their number, their SHA-256, the first of each block).

An experiment is opened from its URI (``tiledbsoma.open``), or from a collection of experiments such as the Census
(``census_data/<organism>``), or from the public Census through ``cellxgene_census.open_soma``. Gene ids are read
from var like an ``.h5ad`` file's (:func:`~transcriptformer.data.tokenize.gene_id_column`: the checkpoint's column,
else ``feature_id`` of the CELLxGENE schema and the Census, else var names that hold gene ids). The counts are the
X layer ``x_layer``; an experiment without a ``raw`` layer (the Census's name) but with one layer, such as the
``data`` of ``tiledbsoma.io.from_anndata``'s defaults, is read from that one.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import scipy.sparse as sp

from transcriptformer.config import SOMA_BLOCK_CELLS
from transcriptformer.console import say
from transcriptformer.data.sources import CountReader
from transcriptformer.errors import UserError

SOMA_INSTALL = 'pip install "transcriptformer[soma]"'
# The X layer of raw counts in the Census.
CENSUS_X_LAYER = "raw"
JOINID = "soma_joinid"
# The obs and var columns where tiledbsoma.io.from_h5ad keeps the AnnData's obs_names and var_names.
OBS_NAME_COLUMN, VAR_NAME_COLUMN = "obs_id", "var_id"
# Where a Census keeps its experiments, one per organism.
CENSUS_DATA = "census_data"
FILTER_EXAMPLE = "\"tissue_general == 'lung' and is_primary_data == True\""


def import_tiledbsoma() -> ModuleType:
    """The ``tiledbsoma`` package, or a ``UserError`` saying how to install it."""
    try:
        import tiledbsoma
    except ImportError as error:
        raise UserError(
            f"SOMA experiments are read and written with tiledbsoma, which is missing: {SOMA_INSTALL}"
        ) from error
    return tiledbsoma


def experiment_name(organism: str) -> str:
    """The Census' name of an organism's experiment: ``"Homo sapiens"`` -> ``"homo_sapiens"``."""
    return "_".join(organism.strip().lower().split())


def first_line(error: BaseException) -> str:
    """The first line of an error's message (tiledbsoma appends stack traces of its C++ core)."""
    text = str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0].removeprefix("SOMAError: ")


def obs_filter_rows(obs: pd.DataFrame, obs_filter: str, source: str) -> np.ndarray:
    """``(len(obs),)`` bool: the cells of a file's ``obs`` that a SOMA value filter selects.

    The filter is read as tiledbsoma reads it (comparisons of obs columns with values, ``and``, ``or``, ``not``,
    ``in [...]``), here by pandas' ``DataFrame.eval``, so that one filter selects cells of a file and of an
    experiment alike.
    """
    try:
        selected = obs.eval(obs_filter, engine="python")
        if not (isinstance(selected, pd.Series) and selected.dtype == bool):
            raise ValueError("it is not a condition on each cell")
    except Exception as error:  # pandas raises SyntaxError, NameError (an unknown column), TypeError or ValueError
        shown = ", ".join(map(str, obs.columns[:12])) + (", ..." if len(obs.columns) > 12 else "")
        raise UserError(
            f"obs_filter {obs_filter!r} is not a valid filter on obs ({first_line(error)}); write it like "
            f"{FILTER_EXAMPLE} with obs columns of {source} ({shown})"
        ) from None
    if not selected.any():
        raise UserError(f"obs_filter {obs_filter!r} selects no cells of {source}; relax it")
    return selected.to_numpy()


def open_census(census_version: str):
    """The public CELLxGENE Census of ``census_version`` (a SOMA collection); it needs the network."""
    try:
        import cellxgene_census
    except ImportError as error:
        raise UserError(
            f"census_version opens the Census with cellxgene-census, which is missing: {SOMA_INSTALL}"
        ) from error
    try:
        return cellxgene_census.open_soma(census_version=census_version)
    except ValueError as error:  # a version that the Census' directory does not list
        raise UserError(f"`census_version` {census_version}: {first_line(error)}") from None
    except (OSError, RuntimeError) as error:  # requests' connection errors are OSErrors; TileDB's are RuntimeErrors
        raise UserError(
            f"could not reach the CELLxGENE Census (`census_version` {census_version}): {first_line(error)}; "
            "check the network, or copy the Census to a folder (docs/scale.md) and read it with `soma` FOLDER "
            "and `organism` NAME"
        ) from None


def absolute_uri(uri: str) -> str:
    """``uri`` with a local folder made absolute.

    TileDB resolves a relative folder against the working folder of its first use in the process, not the current one.
    """
    return uri if "://" in uri else str(Path(uri).absolute())


def open_soma_uri(uri: str):
    """The SOMA object at ``uri`` (a folder, ``file://``, ``s3://``, ...), open for reading."""
    soma = import_tiledbsoma()
    try:
        return soma.open(absolute_uri(uri))
    except soma.DoesNotExistError:
        raise UserError(
            f"`soma` {uri}: there is no SOMA experiment or Census there; give the folder or s3:// URI of one "
            "(tiledbsoma.io.from_h5ad writes an experiment from an .h5ad file)"
        ) from None
    except (soma.SOMAError, RuntimeError, TypeError) as error:
        raise UserError(f"`soma` {uri}: cannot open it as a SOMA object ({first_line(error)})") from None


def select_experiment(root, organism: str | None, where: str):
    """``root`` itself when it is an experiment; else its (or its ``census_data``'s) experiment of ``organism``."""
    if root.soma_type == "SOMAExperiment":
        return root
    if root.soma_type != "SOMACollection":
        raise UserError(f"{where} is a {root.soma_type}, not a SOMA experiment or a collection of them (a Census)")
    experiments = root[CENSUS_DATA] if CENSUS_DATA in root else root
    names = sorted(experiments.keys())
    if organism is None:
        raise UserError(f"{where} holds several experiments ({', '.join(names)}); choose one with `organism`")
    name = experiment_name(organism)
    if name not in names:
        raise UserError(f"{where} holds no experiment {name!r} (`organism` {organism!r}); it holds {', '.join(names)}")
    return experiments[name]


def _member(collection, key: str, flag: str, what: str):
    """``collection[key]``, or a ``UserError`` naming the flag and the keys that exist."""
    if key not in collection:
        raise UserError(f"{flag} {key}: the experiment has no {what} {key!r}; it has {', '.join(collection.keys())}")
    return collection[key]


def only_layer(layers, x_layer: str) -> str:
    """``x_layer``; for the Census's ``raw`` in an experiment that lacks it and has one layer, that layer."""
    names = list(layers.keys())
    if x_layer == CENSUS_X_LAYER and x_layer not in names and len(names) == 1:
        say(f"reading the experiment's one X layer {names[0]!r} (it has no layer {x_layer!r})")
        return names[0]
    return x_layer


class SomaReader(CountReader):
    """The cells of a SOMA experiment that an obs value filter selects, in ascending ``soma_joinid`` order.

    Nothing of the query is held per cell: opening it streams its joinids once, keeping their number, their SHA-256
    and the first joinid of every block of ``block_cells`` cells; the joinids, names and obs columns of a block are
    read again when its cells are (:meth:`read_obs`, :meth:`joinids`, :meth:`rows`; the last two blocks are kept).

    Parameters
    ----------
    uri
        The experiment, or a collection of experiments (a Census), as a folder or URI; ``None`` with
        ``census_version``.
    organism
        The experiment of a collection (``"homo_sapiens"`` or ``"Homo sapiens"``); not needed for an experiment.
    obs_filter
        A SOMA value filter on obs columns, e.g. ``"tissue_general == 'lung' and is_primary_data == True"``;
        ``None``: every cell.
    measurement, x_layer
        The measurement (``RNA``) and its X layer of counts (``raw``, or the one layer of an experiment without
        ``raw``).
    obs_columns
        The obs columns to read besides ``soma_joinid``; ``None``: all. Names the experiment lacks are left out.
    census_version
        Open the public CELLxGENE Census of this version instead of ``uri`` (needs the network).
    block_cells
        Cells of the query per block of obs read at a time.

    Attributes
    ----------
    var : DataFrame
        The measurement's var, in ``soma_joinid`` order, indexed by ``var_id`` when present, else the joinid.
    experiment_uri : str
        Where the experiment is.
    x_layer : str
        The X layer read.
    max_joinid : int
        The largest ``soma_joinid`` of the query.
    query_sha256 : str
        SHA-256 of the query's joinids (``int64``, ascending): what changes when the filter selects other cells.
    """

    streamed = True

    def __init__(
        self,
        uri: str | None,
        organism: str | None = None,
        obs_filter: str | None = None,
        measurement: str = "RNA",
        x_layer: str = CENSUS_X_LAYER,
        obs_columns: Sequence[str] | None = None,
        census_version: str | None = None,
        block_cells: int = SOMA_BLOCK_CELLS,
    ):
        self.source = uri if census_version is None else f"the CELLxGENE Census {census_version}"
        self._root = open_census(census_version) if census_version is not None else open_soma_uri(uri)
        self._lock = threading.Lock()  # one read of X at a time: TileDB parallelises each read itself
        self._obs_lock = threading.Lock()  # one read of a block of obs at a time, into the cache
        self._blocks: dict[int, tuple[np.ndarray, pd.DataFrame]] = {}
        self._block_cells, self._filter = block_cells, obs_filter
        try:
            experiment = select_experiment(self._root, organism, self.source)
            if experiment is not self._root:
                self.source = f"{self.source} ({experiment_name(organism)})"
            self.experiment_uri = experiment.uri
            ms = _member(experiment.ms, measurement, "soma_measurement", "measurement")
            self.x_layer = only_layer(ms.X, x_layer)
            self._x = _member(ms.X, self.x_layer, "soma_x_layer", "X layer")
            self.var = self._read_var(ms.var)
            self._obs = experiment.obs
            self._columns = self._obs_columns_read(obs_columns)
            self._index_query()
        except BaseException:
            self._root.close()
            raise
        self._var_joinids = self.var[JOINID].to_numpy(dtype=np.int64)

    def _read_var(self, var) -> pd.DataFrame:
        frame = var.read().concat().to_pandas().sort_values(JOINID, kind="stable")
        names = frame[VAR_NAME_COLUMN] if VAR_NAME_COLUMN in frame.columns else frame[JOINID]
        return frame.set_index(pd.Index(names.astype(str).to_numpy()))

    def _obs_columns_read(self, columns: Sequence[str] | None) -> list[str]:
        """The obs columns read: ``soma_joinid``, ``columns`` (all without them) and ``obs_id``, those obs has."""
        stored = self._obs.schema.names
        wanted = stored if columns is None else [JOINID, *columns, OBS_NAME_COLUMN]
        return list(dict.fromkeys(c for c in wanted if c in stored))

    def _index_query(self) -> None:
        """Stream the query's joinids once: their number, their SHA-256 and the first joinid of each block."""
        sha, firsts, n, last = hashlib.sha256(), [], 0, -1
        for joinids in self._query_joinids():
            if joinids.size and (joinids[0] <= last or np.any(np.diff(joinids) <= 0)):
                raise ValueError(f"{self.source}: obs returned the query's joinids out of order")
            firsts.append(joinids[(-n) % self._block_cells :: self._block_cells])
            sha.update(joinids.tobytes())
            n += joinids.size
            last = int(joinids[-1]) if joinids.size else last
        if not n:
            raise UserError(
                f"{self.source} holds no cells"
                if self._filter is None
                else f"obs_filter {self._filter!r} selects no cells of {self.source}; relax it"
            )
        self._n_obs, self.max_joinid, self.query_sha256 = n, last, sha.hexdigest()
        self._block_firsts = np.concatenate(firsts)

    def _query_joinids(self) -> Iterator[np.ndarray]:
        """The query's joinids, ascending, in tiledbsoma's batches; a filter it cannot use is a ``UserError``."""
        try:
            read = self._obs.read(value_filter=self._filter, column_names=[JOINID], result_order="row-major")
            for table in read:
                yield table[JOINID].to_numpy().astype(np.int64, copy=False)
        except Exception as error:  # tiledbsoma raises SOMAError, TypeError or ValueError for a filter it cannot use
            if self._filter is None:
                raise
            stored = self._obs.schema.names
            shown = ", ".join(c for c in stored[:12] if c != JOINID) + (", ..." if len(stored) > 12 else "")
            raise UserError(
                f"obs_filter {self._filter!r} is not a valid SOMA value filter on obs ({first_line(error)}); write "
                f"it like {FILTER_EXAMPLE} with obs columns of {self.source} ({shown})"
            ) from None

    @property
    def n_obs(self) -> int:
        """Cells of the query."""
        return self._n_obs

    @property
    def obs_columns(self) -> list[str]:
        """The columns of :meth:`read_obs`: ``soma_joinid`` and the requested ones the experiment has."""
        return [c for c in self._columns if c != OBS_NAME_COLUMN]

    def _block(self, index: int) -> tuple[np.ndarray, pd.DataFrame]:
        """The joinids and obs of the query's block ``index`` (the last two blocks read are kept)."""
        with self._obs_lock:
            if index not in self._blocks:
                if len(self._blocks) == 2:
                    del self._blocks[next(iter(self._blocks))]
                frame = self._read_block(index)
                self._blocks[index] = (frame[JOINID].to_numpy(dtype=np.int64), frame)
            return self._blocks[index]

    def _read_block(self, index: int) -> pd.DataFrame:
        """The obs of the query's block ``index``: the filter's cells among the block's range of joinids."""
        firsts = self._block_firsts
        last = int(firsts[index + 1]) - 1 if index + 1 < firsts.size else self.max_joinid
        coords = (slice(int(firsts[index]), last),)  # both ends included
        read = self._obs.read(coords=coords, value_filter=self._filter, column_names=self._columns)
        frame = read.concat().to_pandas().sort_values(JOINID, kind="stable")[self._columns]
        expected = min(self._block_cells, self.n_obs - index * self._block_cells)
        if len(frame) != expected:
            raise ValueError(f"{self.source}: block {index} of the query holds {len(frame)} cells, not {expected}")
        names = frame.pop(OBS_NAME_COLUMN).astype(str) if OBS_NAME_COLUMN in frame.columns else frame[JOINID]
        return frame.set_index(pd.Index(names.to_numpy()))  # joinids: integers, 8 bytes a cell

    def _blocks_of(self, start: int, stop: int | None) -> Iterator[tuple[tuple[np.ndarray, pd.DataFrame], slice]]:
        """Each block holding cells ``start .. stop - 1`` of the query, with the slice of those cells in it."""
        stop = self.n_obs if stop is None else min(stop, self.n_obs)
        for index in range(start // self._block_cells, -(-stop // self._block_cells)):
            offset = index * self._block_cells
            yield self._block(index), slice(max(start - offset, 0), stop - offset)

    def joinids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``(stop - start,)`` int64 ``soma_joinid`` of cells ``start .. stop - 1`` of the query (all by default)."""
        blocks = [joinids[cells] for (joinids, _), cells in self._blocks_of(start, stop)]
        return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)

    def read_obs(self, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """The obs of cells ``start .. stop - 1`` of the query (all by default): :attr:`obs_columns`, indexed by name.

        Names are ``obs_id`` when the experiment has it (as written by ``tiledbsoma.io.from_h5ad``), else the joinids
        (integers; an ``.h5ad`` output writes them as strings).
        """
        frames = [obs.iloc[cells] for (_, obs), cells in self._blocks_of(start, stop)]
        if not frames:
            return pd.DataFrame(columns=self.obs_columns)
        return frames[0] if len(frames) == 1 else pd.concat(frames)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of cells ``start .. stop - 1`` of the query (their joinids' rows of X), over the genes of var.

        The stored entries of those rows are read as arrow tables of ``(soma_dim_0, soma_dim_1, soma_data)`` and
        placed by joinid (both axes' joinids are ascending). ``blockwise().scipy()`` of tiledbsoma does the same,
        but with it the peak memory grew with the cells read (190 MB over 400,000 cells of the benchmark).
        """
        joinids = self.joinids(start, stop)
        if not joinids.size:
            return sp.csr_matrix((0, len(self.var)), dtype=np.float32)
        with self._lock:
            table = self._x.read(coords=(joinids, self._var_joinids)).tables().concat()
        rows = np.searchsorted(joinids, table["soma_dim_0"].to_numpy())
        columns = np.searchsorted(self._var_joinids, table["soma_dim_1"].to_numpy())
        values = table["soma_data"].to_numpy().astype(np.float32, copy=False)
        return sp.csr_matrix((values, (rows, columns)), shape=(joinids.size, len(self.var)))

    def close(self) -> None:
        """Close the experiment (or the Census)."""
        self._root.close()
