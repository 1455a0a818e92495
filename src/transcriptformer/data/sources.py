"""Row-chunked readers of count matrices: in-memory AnnData, backed ``.h5ad``, ``.zarr`` and 10x ``.h5``.

A reader exposes the gene table (``var``), the cell table (``obs``) and ``rows(start, stop)``, which returns
those cells' counts as a CSR matrix. Files are opened lazily and read one row block at a time, so memory
does not grow with the number of cells.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

from transcriptformer.data.hdf5 import open_hdf5
from transcriptformer.errors import UserError
from transcriptformer.safe_load import check_zarr_store

SUFFIXES = (".h5ad", ".zarr", ".h5")
H5AD = "an AnnData .h5ad file"
# The datasets of a Cell Ranger v3 feature-barcode matrix, under its group "matrix".
TENX_DATASETS = (
    "barcodes",
    "data",
    "indices",
    "indptr",
    "shape",
    "features/id",
    "features/name",
    "features/feature_type",
)


class CountReader(ABC):
    """Counts of ``n_obs`` cells over the genes of ``var``, read in row blocks.

    A file's reader holds its ``obs``; a ``streamed`` reader (the cells of a SOMA query) holds nothing per cell and
    reads the obs of a block of cells with its counts (:meth:`read_obs`).
    """

    var: pd.DataFrame
    obs: pd.DataFrame
    source: str
    streamed = False

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return len(self.obs)

    @property
    def obs_columns(self) -> list[str]:
        """The columns of :meth:`read_obs`."""
        return list(self.obs.columns)

    def read_obs(self, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """The obs of cells ``start .. stop - 1`` (all by default), indexed by the cells' names."""
        return self.obs.iloc[start:stop]

    @abstractmethod
    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of cells ``start .. stop - 1`` as CSR ``(stop - start, n_vars)``."""

    def close(self) -> None:
        """Release the underlying file, if any."""
        return None

    def __enter__(self) -> CountReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_csr(block) -> sp.csr_matrix:
    if isinstance(block, sp.csr_matrix):
        return block
    if block.dtype == np.float16:  # scipy.sparse holds no float16; float32 holds every float16 value exactly
        block = np.asarray(block, dtype=np.float32)
    return sp.csr_matrix(block)


class _CsrArrays:
    """Row blocks of a CSR matrix stored as its three arrays (HDF5 datasets), values as ``float32``.

    For the matrices that ``scipy.sparse`` cannot read directly: 10x ``.h5`` files, and AnnData files whose CSR
    values are ``float16``.
    """

    def __init__(self, data, indices, indptr: np.ndarray, n_vars: int):
        self._data, self._indices, self._indptr, self._n_vars = data, indices, indptr, n_vars

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        start, stop = rows.start, rows.stop
        lo, hi = self._indptr[start], self._indptr[stop]
        indptr = self._indptr[start : stop + 1] - lo
        data = np.asarray(self._data[lo:hi], dtype=np.float32)
        return sp.csr_matrix((data, self._indices[lo:hi], indptr), shape=(stop - start, self._n_vars))


class AnnDataReader(CountReader):
    """An in-memory AnnData's ``raw`` or ``X``."""

    def __init__(self, adata: ad.AnnData, use_raw: bool | None = None, source: str = "<AnnData>"):
        if use_raw and adata.raw is None:
            raise ValueError("use_raw=True but the AnnData has no .raw")
        from_raw = adata.raw is not None and use_raw is not False
        if not from_raw and adata.X is None:
            raise ValueError("the AnnData has no .X")
        self._matrix = adata.raw.X if from_raw else adata.X
        self.var = adata.raw.var if from_raw else adata.var
        self.obs = adata.obs
        self.source = source

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of cells ``start .. stop - 1``."""
        return _to_csr(self._matrix[start:stop])


class _GroupReader(CountReader):
    """An AnnData written to disk (HDF5 or zarr), read element by element."""

    def __init__(self, root, use_raw: bool | None, source: str):
        has_raw = "raw" in root and "X" in root["raw"]
        if use_raw and not has_raw:
            raise ValueError(f"use_raw=True but {source} has no raw/X; read X instead (`use_raw=False`)")
        base = root["raw"] if has_raw and use_raw is not False else root
        prefix = "raw/" if base is not root else ""
        self.obs = _read_dataframe(root, "obs", "obs", source)
        self.var = _read_dataframe(base, "var", f"{prefix}var", source)
        if "X" not in base:
            raise UserError(f"{source} has no {prefix}X; write the counts into X (or raw.X) with anndata")
        self._matrix = _row_readable(base["X"], source)
        self.source = source

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of cells ``start .. stop - 1``."""
        return _to_csr(self._matrix[start:stop])


def _row_readable(element, source: str):
    """The count matrix ``element`` of an AnnData file, as something that row slices read."""
    encoding = element.attrs.get("encoding-type", "")
    if encoding not in ("csr_matrix", "csc_matrix"):
        return element
    if element["data"].dtype != np.float16:
        return sparse_dataset(element)
    if encoding == "csc_matrix":
        raise ValueError(
            f"{source}: X is a float16 CSC matrix, which cannot be read by rows; store it as float32 CSR: "
            "adata.X = adata.X.astype('float32').tocsr()"
        )
    return _CsrArrays(element["data"], element["indices"], element["indptr"][:], int(element.attrs["shape"][1]))


def _read_dataframe(parent, key: str, name: str, source: str) -> pd.DataFrame:
    """The AnnData data frame ``parent[key]`` (``name`` in messages); a missing or foreign element is refused."""
    frame = read_elem(parent[key]) if key in parent else None
    if not isinstance(frame, pd.DataFrame):
        raise UserError(f"{source} is not a readable AnnData: it has no {name} data frame; write it with anndata")
    return frame


class H5adReader(_GroupReader):
    """A ``.h5ad`` file in backed mode."""

    def __init__(self, path: Path, use_raw: bool | None = None):
        self._file = open_hdf5(path, H5AD)
        try:
            super().__init__(self._file, use_raw, str(path))
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()


class ZarrReader(_GroupReader):
    """An AnnData ``.zarr`` store."""

    def __init__(self, path: Path, use_raw: bool | None = None):
        import zarr

        check_zarr_store(path)  # before zarr reads it: no pickle codec
        try:
            root = zarr.open_group(str(path), mode="r")
        except zarr.errors.GroupNotFoundError as err:
            raise UserError(
                f"{path} is not an AnnData .zarr store (it holds no zarr group); write it with anndata"
            ) from err
        super().__init__(root, use_raw, str(path))


class TenXH5Reader(CountReader):
    """A Cell Ranger (v3+) feature-barcode matrix ``.h5``: genes x cells CSC, i.e. cells x genes CSR.

    A file that lacks a table of the format, or whose tables disagree in size, is refused with what is wrong.
    """

    def __init__(self, path: Path):
        self._file = open_hdf5(path, "a 10x .h5 file")
        self.source = str(path)
        try:
            self._read_tables()
        except BaseException:
            self._file.close()
            raise

    def _read_tables(self) -> None:
        group = self._matrix_group()
        features = group["features"]
        self.var = pd.DataFrame(
            {
                "ensembl_id": features["id"][:].astype(str),
                "gene_symbol": features["name"][:].astype(str),
                "feature_type": features["feature_type"][:].astype(str),
            }
        )
        self.var.index = self.var["ensembl_id"].to_numpy()
        self.obs = pd.DataFrame(index=pd.Index(group["barcodes"][:].astype(str)))
        self._data, self._indices, self._indptr = group["data"], group["indices"], group["indptr"][:]
        self._n_vars = len(self.var)
        self._check_sizes(group["shape"][:])

    def _matrix_group(self) -> h5py.Group:
        """The ``matrix`` group, with every table the reader needs."""
        if "matrix" not in self._file:
            raise UserError(
                f"{self.source} is not a Cell Ranger v3 .h5 file (no 'matrix' group); convert it to .h5ad "
                "(e.g. scanpy.read_10x_h5(path).write_h5ad(...))"
            )
        group = self._file["matrix"]
        missing = [name for name in TENX_DATASETS if not isinstance(group.get(name), h5py.Dataset)]
        if missing:
            self._malformed(f"matrix/ lacks {', '.join(missing)}")
        return group

    def _check_sizes(self, shape: np.ndarray) -> None:
        """``shape`` is (features, barcodes); ``indptr`` has one entry per barcode and one more."""
        n_values, indptr = len(self._data), self._indptr
        if tuple(int(n) for n in shape) != (self._n_vars, self.n_obs):
            self._malformed(
                f"matrix/shape is {shape.tolist()} but there are {self._n_vars} features, {self.n_obs} barcodes"
            )
        if len(self._indices) != n_values:
            self._malformed(f"matrix/indices has {len(self._indices)} entries, matrix/data {n_values}")
        if len(indptr) != self.n_obs + 1 or indptr[0] != 0 or indptr[-1] != n_values or np.any(np.diff(indptr) < 0):
            self._malformed(f"matrix/indptr does not index the {n_values} values of {self.n_obs} barcodes")

    def _malformed(self, problem: str) -> NoReturn:
        raise UserError(f"{self.source} is a malformed 10x .h5 file: {problem}; write it again with Cell Ranger")

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of cells ``start .. stop - 1``."""
        lo, hi = self._indptr[start], self._indptr[stop]
        indptr = self._indptr[start : stop + 1] - lo
        data = np.asarray(self._data[lo:hi], dtype=np.float32)
        indices = self._indices[lo:hi]
        if len(indices) and (indices.min() < 0 or indices.max() >= self._n_vars):
            self._malformed(f"matrix/indices of barcodes {start}-{stop - 1} point outside the {self._n_vars} features")
        return sp.csr_matrix((data, indices, indptr), shape=(stop - start, self._n_vars))

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()


def open_counts(data: ad.AnnData | str | Path, use_raw: bool | None = None) -> CountReader:
    """Open cells for row-block reading.

    Parameters
    ----------
    data
        An in-memory AnnData, or the path of a ``.h5ad``, ``.zarr`` or 10x ``.h5`` file.
    use_raw
        ``None``: ``raw`` when present; ``True``: require it; ``False``: ``X``. 10x files have only one matrix.
    """
    if isinstance(data, ad.AnnData):
        return AnnDataReader(data, use_raw)
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        return H5adReader(path, use_raw)
    if suffix == ".zarr":
        return ZarrReader(path, use_raw)
    if suffix == ".h5":
        if use_raw:
            raise ValueError(f"{path}: a 10x .h5 file has no raw matrix")
        return TenXH5Reader(path)
    raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {SUFFIXES}")


def read_var(paths: Sequence[str | Path]) -> pd.DataFrame:
    """The var of the genes of ``.h5ad``, ``.zarr`` or 10x ``.h5`` files, one after the other, without their counts."""
    frames = []
    for path in paths:
        with open_counts(path) as reader:
            frames.append(reader.var.copy())
    return pd.concat(frames) if frames else pd.DataFrame()


def read_obs(path: str | Path) -> pd.DataFrame:
    """The obs of the cells of a ``.h5ad``, ``.zarr`` or 10x ``.h5`` file, without reading their counts."""
    with open_counts(path) as reader:
        return reader.obs.copy()
