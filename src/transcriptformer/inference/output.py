"""The output ``.h5ad`` of an inference run, written chunk by chunk.

Layout (``n`` cells of all input files, ``g`` genes matched in any of them); where each output goes is its
``anndata`` slot in :data:`transcriptformer.model.outputs.OUTPUTS`::

    obs                 the inputs' obs (original obs_names and order), columns filtered to obs_keys,
                        plus source_file and the per-cell numbers (llh)
    obsm[key]           per-cell vectors: (n, E) cell embeddings
    var                 index: gene ids of the output gene axis
    layers[key]         per-gene numbers (mu, gene_llh): (n, g) sparse, an entry for each gene whose
                        position holds a value (transcriptformer.model.outputs.gene_positions)
    uns["cge"]          contextual gene embeddings, one row per (cell, gene) pair:
                        embeddings (m, E), cell_index (m,) into obs, gene_index (m,) into var
                        (positions in the file as written: read them before subsetting the AnnData,
                        or use :func:`contextual_embeddings`)
    uns[key]            a DataFrame of each per-cell number (uns["llh"]), as the original release wrote it
    uns["transcriptformer"]  checkpoint, versions and the run's settings
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from anndata.io import sparse_dataset, write_elem

from transcriptformer.model.outputs import OUTPUTS
from transcriptformer.pipeline import GeneOutputs


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
    chunks: Iterable[GeneOutputs],
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
        self.obs_values: dict[str, list[np.ndarray]] = {}
        for group in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(file, group, {})
        write_elem(file["uns"], "cge", {})

    def append(self, chunk: GeneOutputs) -> None:
        """Write the outputs of the next ``chunk.n_cells`` cells."""
        rows = slice(self.written, self.written + chunk.n_cells)
        if rows.stop > self.n_cells:
            raise ValueError(f"more cells of outputs than the {self.n_cells} rows of obs")
        for key, values in chunk.cell_values.items():
            if OUTPUTS[key].anndata == "obs":
                self.obs_values.setdefault(key, []).append(values)
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
        """Write obs (with the per-cell numbers), var and uns once every chunk is in."""
        if self.written != self.n_cells:
            raise ValueError(f"{self.written} cells of outputs for {self.n_cells} rows of obs")
        obs = obs.copy()
        for key, values in self.obs_values.items():
            obs[key] = np.concatenate(values)
            write_elem(self.file["uns"], key, pd.DataFrame({key: obs[key].to_numpy()}, index=obs.index.astype(str)))
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
