"""A labelled reference in a FAISS vector index: build, calibrate the Unknown threshold, annotate, save and load.

Exact search (FAISS ``IndexFlat``: every distance computed) for references of up to ``exact_max_cells`` cells.
Above, ``IVF<n_lists>,PQ<m>x4fs,Refine(SQ8)``: k-means lists (``n_probe`` of them searched per query cell), and in
them product-quantised codes of 4 bits per 2 dimensions scanned with SIMD ("fast scan"); the best
``refine_factor * n_neighbors`` candidates are then ranked by their 8-bit scalar-quantised vectors. Per cell of
2,048 dimensions: 512 + 2,048 bytes instead of 8,192 in float32. For the cosine metric the vectors are scaled to
unit length and compared by inner product.

A saved index is a folder::

    manifest.json   format, version, model id, metric, dimension, cell count, label keys, settings, thresholds,
                    SHA-256 of the two files below (written last: a folder without it is incomplete)
    index.faiss     the FAISS index (faiss.write_index)
    labels.npz      rows (reference row of each indexed cell), codes_<i> and classes_<i> of label key i
                    (no pickled objects: read with allow_pickle=False)
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from transcriptformer.annotation.labels import Labels, LabelTable, encode_labels, label_columns
from transcriptformer.annotation.settings import UNKNOWN, AnnotateConfig
from transcriptformer.annotation.transfer import transfer_labels
from transcriptformer.errors import UserError
from transcriptformer.runtime import cpu_threads
from transcriptformer.safe_load import load_npz, sha256_of

FORMAT = "transcriptformer-annotation-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
LABELS_FILE = "labels.npz"
TRAIN_CELLS_PER_LIST = 64  # k-means training cells per inverted list (FAISS warns below 39)
SEARCH_CHUNK_CELLS = 10_000  # query cells searched at a time
NAMED_ROWS = 5  # at most this many rows named in a message


# Queries below which a search runs on one thread: FAISS starts its OpenMP threads for every search, and beside
# torch's own OpenMP threads that costs far more than the search (measured: 700 one-cell searches of 700 cells took
# 136 s on two threads after torch had run in the process, 0.07 s on one).
PARALLEL_SEARCH_QUERIES = 256


def import_faiss() -> Any:
    """The ``faiss`` module, or a ``UserError`` saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise UserError("annotation needs FAISS: pip install 'transcriptformer[annotate]' (or faiss-cpu)") from None
    return faiss


def usable_rows(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Rows that can be indexed or searched: finite, and for cosine not all zero (no direction)."""
    usable = np.isfinite(vectors).all(axis=1)
    if metric == "cosine":
        usable &= np.abs(vectors).max(axis=1, initial=0.0) > 0
    return usable


def prepared(vectors: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-ordered vectors as FAISS compares them: scaled to unit length for cosine."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def as_matrix(embeddings: Any, what: str) -> np.ndarray:
    """``embeddings`` as a float32 ``(n_cells, dimension)`` array, or a ``UserError`` naming ``what``."""
    try:
        matrix = np.asarray(embeddings, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise UserError(f"{what} are not a numeric matrix ({err}); give an (n_cells, dimension) array") from None
    if matrix.ndim != 2:
        raise UserError(f"{what} have shape {matrix.shape}; give an (n_cells, dimension) array")
    return matrix


def warn_unusable(unusable: np.ndarray, total: int, what: str, consequence: str, metric: str) -> None:
    """Warn, naming the first rows, about cells whose embedding is NaN, infinite or (cosine) zero."""
    rows = ", ".join(map(str, unusable[:NAMED_ROWS])) + (", ..." if len(unusable) > NAMED_ROWS else "")
    zero = " or all zero" if metric == "cosine" else ""
    warnings.warn(
        f"{len(unusable)} of {total} {what} have NaN or infinite embeddings{zero} (rows {rows}); {consequence}",
        stacklevel=3,
    )


@dataclass
class Calibration:
    """The Unknown threshold of one label key, chosen on held-out reference cells."""

    threshold: float
    accuracy: float  # share of the held-out cells (with a label) labelled correctly by the rest of the reference
    cells: int  # held-out cells with a label


class ReferenceIndex:
    """Reference cells in a vector index, with their labels and the Unknown threshold of each label key.

    Build one with :meth:`build`, label query cells with :meth:`annotate`, keep it with :meth:`save` and
    :meth:`load`.
    """

    def __init__(
        self,
        index: Any,
        *,
        settings: AnnotateConfig,
        labels: list[LabelTable],
        rows: np.ndarray,
        calibration: dict[str, Calibration],
        model_id: str | None,
    ) -> None:
        self.index = index
        self.settings = settings
        self.labels = labels
        self.rows = rows
        self.calibration = calibration
        self.model_id = model_id

    @property
    def dimension(self) -> int:
        """Dimensions of the embeddings."""
        return int(self.index.d)

    @property
    def n_cells(self) -> int:
        """Indexed reference cells (cells with unusable embeddings are left out)."""
        return int(self.index.ntotal)

    @property
    def label_keys(self) -> list[str]:
        """The label keys transferred, in order."""
        return [table.key for table in self.labels]

    @property
    def exact(self) -> bool:
        """Whether every distance is computed (a flat index) rather than approximated."""
        return isinstance(self.index, import_faiss().IndexFlat)

    @classmethod
    def build(
        cls,
        embeddings: Any,
        labels: Labels,
        label_keys: str | Sequence[str] | None = None,
        *,
        model_id: str | None = None,
        settings: AnnotateConfig | None = None,
    ) -> ReferenceIndex:
        """Index the reference cells and choose each label key's Unknown threshold on held-out reference cells.

        Parameters
        ----------
        embeddings
            ``(n_cells, dimension)`` reference embeddings: a NumPy array, or any array read by row slices
            (``embeddings[start:stop]``) and sorted row lists, e.g. a memory map or an HDF5 dataset of a backed
            ``.h5ad``'s ``obsm``, read ``chunk_cells`` rows at a time.
        labels
            The reference's labels: a table (e.g. its ``obs``) whose ``label_keys`` columns are transferred, a
            mapping of key to values, or one column of values; one value per reference cell, missing ones allowed.
        label_keys
            The columns of ``labels`` to transfer; ``None``: every column (or the one column given).
        model_id
            Identity of the model that computed the embeddings (e.g. its weights' SHA-256); recorded, and a query
            from another model is refused.
        settings
            Neighbours, metric, threshold rule and index settings; the defaults of :class:`AnnotateConfig`.

        Raises
        ------
        UserError
            Empty reference, unknown label key, labels all missing, a class named ``"Unknown"``, no usable cell.
        """
        settings = settings or AnnotateConfig()
        n_cells, dimension = _shape(embeddings)
        if n_cells == 0 or dimension == 0:
            raise UserError(f"the reference has no cells to index (embeddings of shape {(n_cells, dimension)})")
        tables = [encode_labels(key, column) for key, column in label_columns(labels, label_keys, n_cells).items()]
        index = _empty_index(n_cells, dimension, settings)
        if not index.is_trained:
            _train(index, embeddings, n_cells, settings)
        rows, held_out = _add_in_chunks(index, embeddings, n_cells, settings)
        if len(rows) < n_cells:
            unusable = np.setdiff1d(np.arange(n_cells), rows)
            warn_unusable(unusable, n_cells, "reference cells", "they are left out of the index", settings.metric)
        if not len(rows):
            raise UserError("no reference cell has a usable embedding; check the reference embeddings")
        for table in tables:
            table.codes = table.codes[rows]
        reference = cls(index, settings=settings, labels=tables, rows=rows, calibration={}, model_id=model_id)
        reference.calibration = reference._calibrate(*held_out)
        return reference

    def search(self, vectors: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest reference cells of each (prepared) vector: ids (-1: none) and distances.

        Distances are ``1 - cosine similarity`` (cosine) or Euclidean; ``exclude`` lists reference ids left out.
        """
        faiss = import_faiss()
        faiss.omp_set_num_threads(cpu_threads() if len(vectors) >= PARALLEL_SEARCH_QUERIES else 1)
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(exclude.astype(np.int64))) if exclude is not None else None
        if self.exact:
            params = faiss.SearchParameters(sel=selector) if selector else None
        else:
            lists = faiss.SearchParametersIVF(nprobe=self.settings.n_probe, sel=selector)
            params = faiss.IndexRefineSearchParameters(k_factor=self.settings.refine_factor, base_index_params=lists)
        scores, ids = self.index.search(vectors, k, params=params)
        if self.settings.metric == "cosine":
            return ids, 1.0 - scores
        return ids, np.sqrt(np.maximum(scores, 0.0))

    def annotate(
        self, query_embeddings: Any, *, model_id: str | None = None, reject: bool | None = None
    ) -> pd.DataFrame:
        """Transfer each label key to the query cells.

        Parameters
        ----------
        query_embeddings
            ``(n_cells, dimension)`` query embeddings, from the model that embedded the reference. Cells with NaN
            or infinite embeddings (empty cells), or all zeros under cosine, get no label (NaN) and a warning.
        model_id
            Identity of the model that computed them; refused when the index records another one (the check
            needs both: a query or an index without a model id is not checked).
        reject
            Call ``"Unknown"`` the cells below each key's threshold; ``None``: the index's setting.

        Returns
        -------
        DataFrame
            One row per query cell, in order: ``predicted_<key>`` (categorical: the reference's classes and
            ``"Unknown"``) and ``<key>_confidence`` (float32 in [0, 1]) for each label key.

        Raises
        ------
        UserError
            Another model's or another dimension's embeddings.
        """
        self.check_model(model_id)
        query = as_matrix(query_embeddings, "query embeddings")
        if query.shape[1] != self.dimension:
            raise UserError(
                f"query embeddings have {query.shape[1]} dimensions, the reference index {self.dimension}; embed "
                "query and reference with the same model"
            )
        usable = usable_rows(query, self.settings.metric)
        if not usable.all():
            warn_unusable(
                np.flatnonzero(~usable), len(query), "query cells", "they get no label (NaN)", self.settings.metric
            )
        neighbors, distances = self._search_in_chunks(prepared(query[usable], self.settings.metric))
        reject = self.settings.reject if reject is None else reject
        columns = {}
        for table in self.labels:
            codes, confidence = transfer_labels(neighbors, distances, table, self.settings.metric)
            threshold = self.calibration[table.key].threshold if reject else 0.0
            names = np.append(table.classes, UNKNOWN)
            predicted = np.where((codes < 0) | (confidence < threshold), len(table.classes), codes)
            labels = pd.Categorical.from_codes(np.full(len(query), -1), categories=names)
            labels[usable] = names[predicted]
            columns[f"predicted_{table.key}"] = labels
            columns[f"{table.key}_confidence"] = _spread(confidence, usable)
        return pd.DataFrame(columns)

    def save(self, folder: str | Path) -> Path:
        """Write the index to a new folder (see the module's docstring); the manifest is written last."""
        faiss = import_faiss()
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            raise UserError(f"{folder} exists and is not empty; choose a new folder for the index or remove it")
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / INDEX_FILE))
        arrays = {"rows": self.rows.astype(np.int64)}
        for i, table in enumerate(self.labels):
            arrays[f"codes_{i}"] = table.codes
            arrays[f"classes_{i}"] = table.classes.astype(str)
        np.savez(folder / LABELS_FILE, **arrays)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model_id": self.model_id,
            "metric": self.settings.metric,
            "dimension": self.dimension,
            "n_cells": self.n_cells,
            "exact": self.exact,
            "label_keys": self.label_keys,
            "calibration": {key: dataclasses.asdict(value) for key, value in self.calibration.items()},
            "settings": dataclasses.asdict(self.settings),
            "sha256": {name: sha256_of(folder / name) for name in (INDEX_FILE, LABELS_FILE)},
        }
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ReferenceIndex:
        """Read an index written by :meth:`save`, after checking its manifest and its files' SHA-256.

        Raises
        ------
        UserError
            No manifest (not an index, or an interrupted save), another format, a changed or unreadable file.
        """
        faiss = import_faiss()
        folder = Path(folder)
        manifest = _read_manifest(folder)
        for name, digest in manifest["sha256"].items():
            if not (folder / name).is_file() or sha256_of(folder / name) != digest:
                raise UserError(f"{folder / name} is missing or changed since the index was saved; build it again")
        index = faiss.read_index(str(folder / INDEX_FILE))
        arrays = load_npz(folder / LABELS_FILE, what="annotation labels", fix="build the index again")
        tables = [
            LabelTable(key=key, classes=arrays[f"classes_{i}"], codes=arrays[f"codes_{i}"])
            for i, key in enumerate(manifest["label_keys"])
        ]
        n_cells = manifest["n_cells"]
        if index.d != manifest["dimension"] or index.ntotal != n_cells or len(arrays["rows"]) != n_cells:
            raise UserError(f"{folder}: the index does not match its manifest; build it again")
        return cls(
            index,
            settings=AnnotateConfig(**manifest["settings"]),
            labels=tables,
            rows=arrays["rows"],
            calibration={key: Calibration(**value) for key, value in manifest["calibration"].items()},
            model_id=manifest["model_id"],
        )

    def check_model(self, model_id: str | None) -> None:
        """Raise a ``UserError`` when ``model_id`` and the index's are both known and differ."""
        if model_id is not None and self.model_id is not None and model_id != self.model_id:
            raise UserError(
                f"the query was embedded by model {model_id}, the reference index by model {self.model_id}; embed "
                "the query with the reference's model or build the index again with this one"
            )

    def _search_in_chunks(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = self.settings.n_neighbors
        starts = range(0, len(vectors), SEARCH_CHUNK_CELLS)
        parts = [self.search(vectors[start : start + SEARCH_CHUNK_CELLS], k) for start in starts]
        if not parts:
            return np.empty((0, k), dtype=np.int64), np.empty((0, k), dtype=np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _calibrate(self, ids: np.ndarray, vectors: np.ndarray) -> dict[str, Calibration]:
        """Each key's threshold: held-out cells, in folds, are labelled by the rest; see ``false_unknown_rate``."""
        settings = self.settings
        folds = np.array_split(np.arange(len(ids)), max(1, min(settings.calibration_folds, len(ids))))
        neighbors = np.empty((len(ids), settings.n_neighbors), dtype=np.int64)
        distances = np.empty((len(ids), settings.n_neighbors), dtype=np.float32)
        for fold in folds:
            neighbors[fold], distances[fold] = self.search(vectors[fold], settings.n_neighbors, exclude=ids[fold])
        calibration = {}
        for table in self.labels:
            predicted, confidence = transfer_labels(neighbors, distances, table, settings.metric)
            truth = table.codes[ids]
            correct = confidence[(predicted == truth) & (truth >= 0)]
            labelled = int((truth >= 0).sum())
            threshold = 0.0
            if len(correct) and settings.false_unknown_rate > 0:
                threshold = float(np.quantile(correct, settings.false_unknown_rate, method="lower"))
            elif not len(correct):
                warnings.warn(
                    f"label key {table.key!r}: no held-out reference cell is labelled correctly by the others; "
                    "no cell is called Unknown",
                    stacklevel=3,
                )
            calibration[table.key] = Calibration(threshold, len(correct) / max(labelled, 1), labelled)
        return calibration


def _shape(embeddings: Any) -> tuple[int, int]:
    shape = getattr(embeddings, "shape", None)
    if shape is None:
        shape = as_matrix(embeddings, "reference embeddings").shape
    if len(shape) != 2:
        raise UserError(f"reference embeddings have shape {tuple(shape)}; give an (n_cells, dimension) array")
    return int(shape[0]), int(shape[1])


def _empty_index(n_cells: int, dimension: int, settings: AnnotateConfig) -> Any:
    faiss = import_faiss()
    metric = faiss.METRIC_INNER_PRODUCT if settings.metric == "cosine" else faiss.METRIC_L2
    if n_cells <= settings.exact_max_cells:
        return faiss.IndexFlat(dimension, metric)
    n_lists = settings.n_lists or round(math.sqrt(n_cells))
    codes = dimension // 2 if dimension % 2 == 0 else dimension  # 4 bits per 2 dimensions (or per dimension)
    return faiss.index_factory(dimension, f"IVF{n_lists},PQ{codes}x4fs,Refine(SQ8)", metric)


def _read_rows(embeddings: Any, rows: np.ndarray | slice, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Reference rows as float32, and which of them are usable."""
    chunk = as_matrix(embeddings[rows], "reference embeddings")
    return chunk, usable_rows(chunk, metric)


def _train(index: Any, embeddings: Any, n_cells: int, settings: AnnotateConfig) -> None:
    """Train the k-means lists and the quantisers of an approximate index on a random sample of the reference.

    On one thread: product quantisation trains one small k-means per code (1,024 for 2,048 dimensions), for which
    synchronising threads costs more than it saves (measured: 8 times the CPU time on two threads).
    """
    faiss = import_faiss()
    lists = faiss.extract_index_ivf(index)
    rng = np.random.default_rng(settings.seed)
    sample = np.sort(rng.choice(n_cells, min(n_cells, TRAIN_CELLS_PER_LIST * lists.nlist), replace=False))
    chunk, usable = _read_rows(embeddings, sample, settings.metric)
    lists.cp.seed = settings.seed
    faiss.omp_set_num_threads(1)
    index.train(prepared(chunk[usable], settings.metric))


def _add_in_chunks(
    index: Any, embeddings: Any, n_cells: int, settings: AnnotateConfig
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Add the usable reference cells, ``chunk_cells`` rows at a time, and keep the calibration cells' vectors.

    Returns the reference row of each indexed cell, and the ids and vectors of the held-out calibration cells.
    """
    faiss = import_faiss()
    faiss.omp_set_num_threads(cpu_threads())
    calibration = np.zeros(n_cells, dtype=bool)
    rng = np.random.default_rng(settings.seed)
    calibration[rng.choice(n_cells, min(n_cells, settings.calibration_cells), replace=False)] = True
    rows, held_ids, held_vectors = [], [], []
    for start in range(0, n_cells, settings.chunk_cells):
        stop = min(start + settings.chunk_cells, n_cells)
        chunk, usable = _read_rows(embeddings, slice(start, stop), settings.metric)
        vectors = prepared(chunk[usable], settings.metric)
        ids = index.ntotal + np.arange(len(vectors))
        held = calibration[start:stop][usable]
        held_ids.append(ids[held])
        held_vectors.append(vectors[held])
        index.add(vectors)
        rows.append(start + np.flatnonzero(usable))
    return np.concatenate(rows), (np.concatenate(held_ids), np.concatenate(held_vectors))


def _spread(values: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """float32 values of the usable cells at their rows, NaN at the others."""
    out = np.full(len(usable), np.nan, dtype=np.float32)
    out[usable] = values
    return out


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise UserError(
            f"{folder} is not an annotation index (no {MANIFEST_FILE}: not one, or its save was interrupted); "
            "build it again"
        )
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not readable JSON ({err}); build the index again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not the manifest of an annotation index; build it again")
    if manifest.get("version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: index format version {manifest.get('version')}, this version of transcriptformer reads "
            f"{FORMAT_VERSION}; build the index again"
        )
    return manifest
