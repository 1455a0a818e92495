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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

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


def build_anndata(obs: pd.DataFrame, genes: pd.Index, outputs: ChunkOutputs, metadata: dict) -> ad.AnnData:
    """Assemble the output AnnData (layout in the module docstring).

    Parameters
    ----------
    obs
        One row per cell, in output order.
    genes
        Gene ids of the gene axis.
    outputs
        All cells' outputs.
    metadata
        Stored as ``uns["transcriptformer"]``.
    """
    if outputs.n_cells != len(obs):
        raise ValueError(f"{outputs.n_cells} cells of outputs for {len(obs)} rows of obs")
    obs = obs.copy()
    uns: dict = {"transcriptformer": metadata}
    if "llh" in outputs.cell_values:
        obs["llh"] = outputs.cell_values["llh"]
        uns["llh"] = pd.DataFrame({"llh": outputs.cell_values["llh"]}, index=obs.index.astype(str))
    if outputs.cge:
        uns["cge"] = dict(outputs.cge)
    obsm = {"embeddings": outputs.cell_values["embeddings"]} if "embeddings" in outputs.cell_values else None
    var = pd.DataFrame(index=pd.Index(genes, name="gene_id"))
    return ad.AnnData(obs=obs, var=var, obsm=obsm, layers=dict(outputs.gene_values), uns=uns)


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


def write_h5ad_atomic(adata: ad.AnnData, path: Path, overwrite: bool) -> None:
    """Write ``adata`` to a temporary file next to ``path``, then rename it into place.

    An existing ``path`` is kept unless ``overwrite``; an interrupted write leaves no partial output.
    """
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.h5ad")
    try:
        adata.write_h5ad(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
