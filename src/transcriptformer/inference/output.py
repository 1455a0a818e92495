"""Inference outputs: per-chunk results on disk, and the final AnnData.

Layout of the written ``.h5ad`` (``n`` cells of all input files, ``g`` genes matched in any of them)::

    obs                 the inputs' obs (original obs_names and order), columns filtered to obs_keys,
                        plus source_file and, when computed, llh
    obsm["embeddings"]  (n, E) cell embeddings
    var                 index: gene ids of the output gene axis
    layers["mu"], layers["gene_llh"]
                        (n, g) sparse; an entry for each gene a cell's sequence holds
    uns["cge"]          contextual gene embeddings, one row per (cell, gene) pair:
                        embeddings (m, E), cell_index (m,) into obs, gene_index (m,) into var
                        (positions in the file as written: read them before subsetting the AnnData,
                        or use :func:`contextual_embeddings`)
    uns["llh"]          DataFrame with the llh column, as the original release wrote it
    uns["transcriptformer"]  checkpoint, versions and the run's settings
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem

CGE_ARRAYS = ("embeddings", "cell_index", "gene_index")


@dataclass
class ChunkOutputs:
    """Outputs of consecutive cells.

    Attributes
    ----------
    n_cells : int
    cell_values : dict of str to ndarray
        Per-cell outputs: ``embeddings`` ``(n, E)``, ``llh`` ``(n,)``.
    gene_values : dict of str to csr_matrix
        Per-gene outputs (``mu``, ``gene_llh``) as ``(n, n_genes)`` sparse matrices.
    cge : dict of str to ndarray
        Contextual gene embeddings: ``embeddings`` ``(m, E)``, ``cell_index`` ``(m,)`` (rows of this chunk) and
        ``gene_index`` ``(m,)`` (columns of the gene axis).
    """

    n_cells: int
    cell_values: dict[str, np.ndarray] = field(default_factory=dict)
    gene_values: dict[str, sp.csr_matrix] = field(default_factory=dict)
    cge: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_positions(
        cls,
        cell_values: Mapping[str, np.ndarray],
        position_values: Mapping[str, np.ndarray],
        columns: np.ndarray,
        scored: Mapping[str, np.ndarray],
        n_genes: int,
    ) -> ChunkOutputs:
        """Turn one batch's per-position outputs into per-gene ones.

        Parameters
        ----------
        cell_values
            Per-cell outputs, ``(B, ...)``.
        position_values
            Per-position outputs ``(B, L)`` (``mu``, ``gene_llh``) or ``(B, L, E)`` (``cge``).
        columns
            ``(B, L)`` column of the gene axis that each position holds.
        scored
            ``(B, L)`` bool per output: the positions to keep.
        n_genes
            Length of the gene axis.
        """
        n_cells = columns.shape[0]
        chunk = cls(n_cells=n_cells, cell_values=dict(cell_values))
        for key, values in position_values.items():
            keep = scored[key]
            if key == "cge":
                rows, _ = np.nonzero(keep)
                chunk.cge = {"embeddings": values[keep], "cell_index": rows, "gene_index": columns[keep]}
            else:
                indptr = np.concatenate([[0], np.cumsum(keep.sum(1))])
                matrix = sp.csr_matrix((values[keep], columns[keep], indptr), shape=(n_cells, n_genes))
                matrix.sort_indices()
                chunk.gene_values[key] = matrix
        return chunk

    @classmethod
    def concat(cls, chunks: Sequence[ChunkOutputs]) -> ChunkOutputs:
        """Stack chunks of consecutive cells, in order."""
        if not chunks:
            raise ValueError("no chunk to concatenate")
        first = chunks[0]
        merged = cls(n_cells=sum(c.n_cells for c in chunks))
        merged.cell_values = {k: np.concatenate([c.cell_values[k] for c in chunks]) for k in first.cell_values}
        merged.gene_values = {k: sp.vstack([c.gene_values[k] for c in chunks], format="csr") for k in first.gene_values}
        if first.cge:
            offsets = np.cumsum([0] + [c.n_cells for c in chunks[:-1]])
            merged.cge = {
                "embeddings": np.concatenate([c.cge["embeddings"] for c in chunks]),
                "cell_index": np.concatenate([c.cge["cell_index"] + o for c, o in zip(chunks, offsets, strict=True)]),
                "gene_index": np.concatenate([c.cge["gene_index"] for c in chunks]),
            }
        return merged

    def take(self, cells: np.ndarray) -> ChunkOutputs:
        """The outputs of some distinct cells, in the given order: cell ``i`` of the result is ``cells[i]`` here."""
        cells = np.asarray(cells)
        taken = ChunkOutputs(n_cells=len(cells))
        taken.cell_values = {k: v[cells] for k, v in self.cell_values.items()}
        taken.gene_values = {k: v[cells] for k, v in self.gene_values.items()}
        if self.cge:
            new_position = np.full(self.n_cells, -1)
            new_position[cells] = np.arange(len(cells))
            cell_index = new_position[self.cge["cell_index"]]
            kept = np.flatnonzero(cell_index >= 0)
            rows = kept[np.argsort(cell_index[kept], kind="stable")]
            taken.cge = {k: v[rows] for k, v in self.cge.items()} | {"cell_index": cell_index[rows]}
        return taken

    def save(self, path: Path) -> None:
        """Write to an ``.npz`` file (through a temporary name, so that a partial file never exists)."""
        arrays = {"n_cells": np.array(self.n_cells)}
        arrays |= {f"cell/{k}": v for k, v in self.cell_values.items()}
        for key, matrix in self.gene_values.items():
            arrays |= {
                f"gene/{key}/data": matrix.data,
                f"gene/{key}/indices": matrix.indices,
                f"gene/{key}/indptr": matrix.indptr,
                f"gene/{key}/shape": np.array(matrix.shape),
            }
        arrays |= {f"cge/{k}": v for k, v in self.cge.items()}
        temporary = path.with_name(path.name + ".tmp.npz")
        np.savez(temporary, **arrays)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: Path) -> ChunkOutputs:
        """Read a file written by :meth:`save` (no pickled objects are accepted)."""
        with np.load(path, allow_pickle=False) as npz:
            arrays = dict(npz)
        chunk = cls(n_cells=int(arrays.pop("n_cells")))
        chunk.cell_values = {name[len("cell/") :]: v for name, v in arrays.items() if name.startswith("cell/")}
        chunk.cge = {name[len("cge/") :]: v for name, v in arrays.items() if name.startswith("cge/")}
        for key in {name.split("/")[1] for name in arrays if name.startswith("gene/")}:
            parts = [arrays[f"gene/{key}/{p}"] for p in ("data", "indices", "indptr")]
            chunk.gene_values[key] = sp.csr_matrix(tuple(parts), shape=tuple(arrays[f"gene/{key}/shape"]))
        return chunk


def concat_obs(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Stack the obs of several files (original obs_names, all columns), in a form that ``.h5ad`` can store.

    A column that some files lack is missing (NaN) for their cells. Columns that become mixed in the stacking
    are converted without losing values: booleans with gaps to pandas' nullable ``boolean``, other mixtures of
    types to strings.
    """
    obs = pd.concat(frames)
    for column in obs.columns:
        if obs[column].dtype == object:
            obs[column] = _writable(obs[column])
    return obs


def _writable(values: pd.Series) -> pd.Series:
    present = values.dropna()
    if present.map(lambda v: isinstance(v, bool | np.bool_)).all():
        return values.astype("boolean")
    if present.map(lambda v: isinstance(v, str)).all():
        return values
    return values.where(values.isna(), values.astype(str))


def write_output(
    path: Path,
    obs: pd.DataFrame,
    genes: pd.Index,
    chunks: Iterable[ChunkOutputs],
    metadata: dict,
    overwrite: bool = False,
) -> None:
    """Write the output ``.h5ad`` (layout in the module docstring) from chunks of consecutive cells.

    Each chunk goes to disk before the next is read, so memory holds one chunk's outputs (plus the small
    per-cell ``llh``) whatever the number of cells. The file is written under a temporary name and renamed
    into place: an existing ``path`` is kept unless ``overwrite``, and an interrupted write leaves no output.

    Parameters
    ----------
    path
        The output file.
    obs
        One row per cell, in output order.
    genes
        Gene ids of the gene axis.
    chunks
        The outputs of all cells, in order.
    metadata
        Stored as ``uns["transcriptformer"]``.
    """
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.h5ad")
    try:
        with h5py.File(temporary, "w") as f:
            writer = _OutputWriter(f, len(obs), len(genes))
            for chunk in chunks:
                writer.append(chunk)
            writer.finish(obs, genes, metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _as_written_by_anndata(obs: pd.DataFrame) -> pd.DataFrame:
    """``obs`` with string columns made categorical (missing values included), as ``AnnData.write_h5ad`` does."""
    holder = ad.AnnData(obs=obs)
    holder.strings_to_categoricals()
    return holder.obs


class _OutputWriter:
    """Appends chunks of outputs to an open ``.h5ad`` file in AnnData's on-disk format."""

    def __init__(self, file: h5py.File, n_cells: int, n_genes: int):
        self.file, self.n_cells, self.n_genes = file, n_cells, n_genes
        self.written = 0
        self.llh: list[np.ndarray] = []
        for group in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(file, group, {})
        write_elem(file["uns"], "cge", {})

    def append(self, chunk: ChunkOutputs) -> None:
        """Write the outputs of the next ``chunk.n_cells`` cells."""
        rows = slice(self.written, self.written + chunk.n_cells)
        if rows.stop > self.n_cells:
            raise ValueError(f"more cells of outputs than the {self.n_cells} rows of obs")
        for key, values in chunk.cell_values.items():
            if key == "llh":
                self.llh.append(values)
            else:
                self._dataset(self.file["obsm"], key, (self.n_cells, *values.shape[1:]), values.dtype)[rows] = values
        for key, matrix in chunk.gene_values.items():
            if key in self.file["layers"]:
                sparse_dataset(self.file["layers"][key]).append(matrix)
            else:
                write_elem(self.file["layers"], key, matrix)
        for key, values in chunk.cge.items():
            values = values + self.written if key == "cell_index" else values
            dataset = self._dataset(self.file["uns/cge"], key, (0, *values.shape[1:]), values.dtype, growing=True)
            dataset.resize(dataset.shape[0] + len(values), axis=0)
            dataset[-len(values) :] = values
        self.written = rows.stop

    def finish(self, obs: pd.DataFrame, genes: pd.Index, metadata: dict) -> None:
        """Write obs (with ``llh``), var and uns once every chunk is in."""
        if self.written != self.n_cells:
            raise ValueError(f"{self.written} cells of outputs for {self.n_cells} rows of obs")
        obs = obs.copy()
        if self.llh:
            obs["llh"] = np.concatenate(self.llh)
            write_elem(
                self.file["uns"], "llh", pd.DataFrame({"llh": obs["llh"].to_numpy()}, index=obs.index.astype(str))
            )
        if not len(self.file["uns/cge"]):
            del self.file["uns/cge"]
        write_elem(self.file, "obs", _as_written_by_anndata(obs))
        write_elem(self.file, "var", pd.DataFrame(index=pd.Index(genes, name="gene_id")))
        write_elem(self.file["uns"], "transcriptformer", metadata)
        self.file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})

    @staticmethod
    def _dataset(group: h5py.Group, key: str, shape: tuple, dtype, growing: bool = False) -> h5py.Dataset:
        """The array ``key`` of ``group``, created (AnnData-encoded) on first use."""
        if key not in group:
            maxshape = (None, *shape[1:]) if growing else None
            group.create_dataset(key, shape=shape, dtype=dtype, maxshape=maxshape, chunks=True if growing else None)
            group[key].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        return group[key]


def contextual_embeddings(adata: ad.AnnData, gene_id: str) -> tuple[pd.Index, np.ndarray]:
    """Every contextual embedding of one gene in an inference output.

    Parameters
    ----------
    adata
        An output file as read from disk (``uns["cge"]`` indexes its cells and genes as written).
    gene_id
        A gene of ``adata.var_names``.

    Returns
    -------
    cells, embeddings
        The names of the cells whose sequence holds the gene, and its ``(len(cells), E)`` embeddings in them.
    """
    if "cge" not in adata.uns:
        raise KeyError("this output has no contextual gene embeddings; run inference with --emb-type cge")
    cge = adata.uns["cge"]
    rows = cge["gene_index"] == adata.var_names.get_loc(gene_id)
    return adata.obs_names[cge["cell_index"][rows]], cge["embeddings"][rows]
