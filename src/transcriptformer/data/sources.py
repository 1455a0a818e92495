"""Row-chunked readers of count matrices: in-memory AnnData, backed ``.h5ad``, ``.zarr`` and 10x ``.h5``.

A reader exposes the gene table (``var``), the cell table (``obs``) and ``rows(start, stop)``, which returns
those cells' counts as a CSR matrix. Files are opened lazily and read one row block at a time, so memory
does not grow with the number of cells.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

SUFFIXES = (".h5ad", ".zarr", ".h5")


class CountReader(ABC):
    """Counts of ``n_obs`` cells over the genes of ``var``, read in row blocks."""

    var: pd.DataFrame
    obs: pd.DataFrame
    source: str

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return len(self.obs)

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
            raise ValueError(f"use_raw=True but {source} has no raw/X")
        base = root["raw"] if has_raw and use_raw is not False else root
        if "X" not in base:
            raise ValueError(f"{source} has no X")
        self._matrix = _row_readable(base["X"], source)
        self.var = read_elem(base["var"])
        self.obs = read_elem(root["obs"])
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


class H5adReader(_GroupReader):
    """A ``.h5ad`` file in backed mode."""

    def __init__(self, path: Path, use_raw: bool | None = None):
        self._file = h5py.File(path, "r")
        super().__init__(self._file, use_raw, str(path))

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()


class ZarrReader(_GroupReader):
    """An AnnData ``.zarr`` store."""

    def __init__(self, path: Path, use_raw: bool | None = None):
        import zarr

        super().__init__(zarr.open_group(str(path), mode="r"), use_raw, str(path))


class TenXH5Reader(CountReader):
    """A Cell Ranger (v3+) feature-barcode matrix ``.h5``: genes x cells CSC, i.e. cells x genes CSR."""

    def __init__(self, path: Path):
        self._file = h5py.File(path, "r")
        if "matrix" not in self._file:
            raise ValueError(f"{path} is not a Cell Ranger v3 .h5 file (no 'matrix' group)")
        group = self._file["matrix"]
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
        self._matrix = _CsrArrays(group["data"], group["indices"], group["indptr"][:], int(group["shape"][0]))
        self.source = str(path)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of cells ``start .. stop - 1``."""
        return self._matrix[start:stop]

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
