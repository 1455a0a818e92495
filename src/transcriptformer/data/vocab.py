"""Gene and auxiliary-token vocabularies (SPEC section 3)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from transcriptformer.data.hdf5 import open_hdf5
from transcriptformer.errors import UserError

EMBEDDING_FILE = "a gene-embedding .h5 file"
PARTIAL_SUFFIX = ".partial"  # .<name>.<pid>.partial: a gene-embedding file being written
# How to get a valid gene-embedding file, for errors about an invalid one.
TABLE_FIX = "build the table with 'transcriptformer build-vocab' (dataset 'keys' of strings, group 'arrays' of vectors)"


@dataclass
class GeneVocab:
    """Map gene ids and special tokens to rows of the gene-embedding table.

    Special tokens come first in their configured order, then the genes of each embedding file in file
    order and key order; a gene seen twice keeps its first index.

    Parameters
    ----------
    index : dict
        Token (special token or gene id) -> integer index.
    special_tokens : list of str
        The special tokens, which hold indices ``0 .. len(special_tokens) - 1``.
    """

    index: dict[str, int]
    special_tokens: list[str]

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, token: str) -> bool:
        return token in self.index

    def __getitem__(self, token: str) -> int:
        return self.index[token]

    def special(self, token: str) -> int:
        """Index of a special token such as ``"[PAD]"``, read from the vocabulary."""
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special token of this vocabulary ({self.special_tokens})")
        return self.index[token]

    @property
    def gene_ids(self) -> list[str]:
        """Gene ids (non-special tokens) in index order."""
        return [t for t in self.index if t not in self.special_tokens]

    def lookup(self, gene_ids: Sequence[str]) -> np.ndarray:
        """Indices of ``gene_ids``; ``-1`` where a gene is not in the vocabulary."""
        return np.fromiter((self.index.get(g, -1) for g in gene_ids), dtype=np.int64, count=len(gene_ids))

    @classmethod
    def build(cls, special_tokens: Sequence[str], gene_ids: Iterable[str]) -> GeneVocab:
        """Build the vocabulary from special tokens followed by gene ids, first occurrence wins."""
        index: dict[str, int] = {}
        for token in [*special_tokens, *gene_ids]:
            index.setdefault(token, len(index))
        return cls(index=index, special_tokens=list(special_tokens))


def read_embedding_keys(path: str | Path) -> list[str]:
    """Gene ids stored in a gene-embedding ``.h5`` file, in file order."""
    with _open_embedding_file(path) as f:
        return _read_keys(f, path)


def read_embedding_table(path: str | Path, gene_ids: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Read a gene-embedding ``.h5`` file (dataset ``keys``, group ``arrays`` of one vector per gene).

    Parameters
    ----------
    path
        The ``<species>_gene.h5`` file.
    gene_ids
        Genes to read; all keys of the file when omitted.

    Returns
    -------
    ids, table
        The gene ids and a ``(len(ids), width)`` float32 array, rows in the order of ``ids``.
    """
    with _open_embedding_file(path) as f:
        ids = list(gene_ids) if gene_ids is not None else _read_keys(f, path)
        rows = [_read_vector(f["arrays"], g, path) for g in ids]
    return ids, np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def partial_table_of(path: Path, pid: int) -> Path:
    """Where process ``pid`` writes the gene-embedding file ``path`` before renaming it into place."""
    return path.with_name(f".{path.name}.{pid}{PARTIAL_SUFFIX}")


def remove_partial_tables(path: Path) -> list[Path]:
    """Delete the temporary files that runs killed while writing ``path`` left; only while holding its lock."""
    prefix = f".{path.name}."
    stale = [
        p
        for p in path.parent.glob(f"{glob.escape(prefix)}*{PARTIAL_SUFFIX}")
        if p.name[len(prefix) : -len(PARTIAL_SUFFIX)].isdigit()
    ]
    for partial in stale:
        partial.unlink(missing_ok=True)
    return stale


def write_embedding_table(path: str | Path, vectors: Mapping[str, np.ndarray]) -> None:
    """Write a gene-embedding file (dataset ``keys``, group ``arrays``), atomically."""
    bad = [gene for gene in vectors if "/" in gene or gene in (".", "")]
    if bad:
        raise ValueError(f"gene ids cannot be HDF5 names: {bad[:5]} (they contain '/' or are empty)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_table_of(path, os.getpid())  # not mkstemp: the user's umask applies
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("keys", data=np.array(list(vectors), dtype="S"))
            arrays = f.create_group("arrays")
            for gene, vector in vectors.items():
                arrays.create_dataset(gene, data=np.asarray(vector, dtype=np.float32))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _open_embedding_file(path: str | Path) -> h5py.File:
    """Open a gene-embedding file, refusing one without its dataset ``keys`` and group ``arrays``."""
    f = open_hdf5(path, EMBEDDING_FILE)
    if not isinstance(f.get("keys"), h5py.Dataset) or not isinstance(f.get("arrays"), h5py.Group):
        f.close()
        raise UserError(f"{path} is not {EMBEDDING_FILE}: expected a dataset 'keys' and a group 'arrays'")
    return f


def _read_keys(f: h5py.File, path: str | Path) -> list[str]:
    """The ``keys`` dataset as strings; other types (opaque bytes such as a pickle, numbers) are refused."""
    keys = f["keys"]
    if keys.dtype.kind != "S" and h5py.check_string_dtype(keys.dtype) is None:
        raise ValueError(f"{path}: dataset 'keys' holds {keys.dtype} values, not gene-id strings; {TABLE_FIX}")
    return [k.decode() if isinstance(k, bytes) else str(k) for k in keys[:]]


def _read_vector(arrays: h5py.Group, gene: str, path: str | Path) -> np.ndarray:
    """One gene's vector as float32; a dataset of another type (opaque bytes, strings) is refused."""
    dataset = arrays[gene]
    if dataset.dtype.kind not in "fiu":
        raise ValueError(f"{path}: arrays/{gene} holds {dataset.dtype} values, not a numeric vector; {TABLE_FIX}")
    return np.asarray(dataset, dtype=np.float32)


def build_gene_vocab(special_tokens: Sequence[str], embedding_files: Sequence[str | Path]) -> GeneVocab:
    """Gene vocabulary of a checkpoint: special tokens, then the keys of each embedding file in order."""
    return GeneVocab.build(special_tokens, (g for path in embedding_files for g in read_embedding_keys(path)))


def load_aux_vocab(path: str | Path, unknown_token: str = "unknown") -> dict[str, int]:
    """Read ``vocabs/<col>_vocab.json``; it must contain the ``unknown_token`` entry."""
    with open(path) as f:
        vocab = {str(k): int(v) for k, v in json.load(f).items()}
    if unknown_token not in vocab:
        raise ValueError(f"{path}: auxiliary vocabulary has no {unknown_token!r} entry")
    return vocab
