"""The SOMA output of an inference run: cell embeddings in a SOMA SparseNDArray indexed by ``soma_joinid``.

Layout, as the CELLxGENE Census stores its hosted embeddings::

    shape       (largest soma_joinid of the query + 1, E), float32
    coords      (soma_joinid, dimension) for every cell of the query with counts; other rows hold nothing (a
                cell without any count among the genes read has no embedding)
    metadata    CxG_embedding_info   JSON: the Census' fields (experiment_name, measurement_name, n_embeddings,
                                     n_features, data_type, census_version, ...) and the run's (model, checkpoint,
                                     weights_sha256, experiment_uri, organism, obs_filter, x_layer, ...)
                complete             True, written last

Rank 0 writes it from the saved units, a few units in memory at a time. A local array (a path or ``file://``) is
written under a temporary name beside its place and renamed into place once complete: a failed run leaves no array
there, and an array it was to replace as it was. A remote one (``s3://``, ``gs://``) cannot be renamed; it is
written in place and ``complete`` is set last, so that readers can tell a finished array from one a failed run left.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from transcriptformer.data.soma import absolute_uri, first_line, import_tiledbsoma
from transcriptformer.engine.output import hold_output
from transcriptformer.errors import UserError

EMBEDDING_INFO = "CxG_embedding_info"  # the metadata key that cellxgene_census reads
COMPLETE = "complete"
TEMPORARY_SUFFIXES = (".tmp-soma", ".old-soma")
# Values (cells x dimensions) written per fragment: fewer, larger fragments read faster; memory holds one block
# (about 80 bytes a value with the coordinates and TileDB's buffers: some 170 MB).
WRITE_BLOCK_VALUES = 1 << 21


def local_path(uri: str) -> Path | None:
    """The folder of a local URI (a path or ``file://``); ``None`` for a remote one (``s3://``, ``tiledb://``)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    return None if "://" in uri else Path(uri).absolute()  # absolute: see data.soma.absolute_uri


def temporary_array_of(path: Path, pid: int, suffix: str) -> Path:
    """Where process ``pid`` writes (``.tmp-soma``) or sets aside (``.old-soma``) the array ``path``."""
    return path.with_name(f".{path.name}.{pid}{suffix}")


def is_embedding_array(uri: str) -> bool:
    """Whether ``uri`` holds a SOMA array of embeddings (one that this module or the Census wrote)."""
    soma = import_tiledbsoma()
    try:
        with soma.open(absolute_uri(uri)) as array:
            return array.soma_type == "SOMASparseNDArray" and EMBEDDING_INFO in array.metadata
    except (soma.SOMAError, RuntimeError):
        return False


def remote_array_exists(uri: str) -> bool:
    """Whether a remote SOMA array exists at ``uri``; a ``UserError`` when the storage cannot be reached."""
    soma = import_tiledbsoma()
    try:
        return soma.SparseNDArray.exists(uri)
    except (soma.SOMAError, RuntimeError) as error:
        raise UserError(
            f"output_soma {uri}: cannot reach it ({first_line(error)}); check the URI and credentials"
        ) from None


@contextmanager
def claim_soma_output(uri: str, overwrite: bool) -> Iterator[None]:
    """Hold the SOMA output ``uri`` for the block: checked before anything is computed, locked when local.

    An existing local array is refused unless ``overwrite``, and replaced only when it is an array of embeddings
    (never another folder). A remote array is not replaced: remove it with the storage's tools first.

    Raises
    ------
    UserError
        The place is a file or a folder that is not an array of embeddings, another run holds it, or a remote array
        exists.
    FileExistsError
        A local array exists and ``overwrite`` is off.
    """
    path = local_path(uri)
    if path is None:
        if remote_array_exists(uri):
            raise UserError(
                f"output_soma {uri} exists, and a remote array is not replaced: remove it with your storage's "
                "tools (e.g. aws s3 rm --recursive) or choose another output_soma"
            )
        yield
        return
    with hold_output(path, ("output_soma",)):
        for stale in path.parent.glob(f".{path.name}.*"):
            if stale.name.endswith(TEMPORARY_SUFFIXES):  # left by a run killed while writing
                shutil.rmtree(stale, ignore_errors=True)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} exists; pass `overwrite=True` to replace it")
            if not is_embedding_array(str(path)):
                raise UserError(
                    f"output_soma {path} exists and is not a SOMA array of embeddings, so `overwrite` does not "
                    "replace it; choose another output_soma"
                )
        yield


def write_soma_embeddings(
    uri: str, chunks: Iterable[tuple[np.ndarray, np.ndarray]], n_rows: int, width: int, info: dict
) -> int:
    """Write cell embeddings to a new SOMA SparseNDArray ``uri`` (layout in the module docstring).

    Parameters
    ----------
    uri
        Where the array goes; a local one replaces an existing array only once it is complete.
    chunks
        ``(soma_joinids, embeddings)`` of consecutive cells, joinids ascending: ``(n,)`` int64, ``(n, width)``
        float32; rows that are NaN (cells without counts) are left out.
    n_rows
        Rows of the array: the largest joinid + 1.
    width
        Dimensions of an embedding.
    info
        Stored as JSON under ``CxG_embedding_info``, with ``n_embeddings`` added.

    Returns
    -------
    int
        The number of embeddings written.

    Raises
    ------
    OSError
        The storage failed (a full disk, no permission); a local array is then left as it was.
    """
    soma = import_tiledbsoma()
    path = local_path(uri)
    target = uri if path is None else str(temporary_array_of(path, os.getpid(), TEMPORARY_SUFFIXES[0]))
    try:
        written = _write_array(soma, target, chunks, n_rows, width, info)
        if path is not None:
            _move_into_place(Path(target), path)
    except (soma.SOMAError, RuntimeError) as error:
        raise OSError(first_line(error)) from error
    finally:
        if path is not None:
            shutil.rmtree(target, ignore_errors=True)
    return written


def _write_array(soma, uri: str, chunks, n_rows: int, width: int, info: dict) -> int:
    import pyarrow as pa

    written = 0
    # One tile spans an embedding's dimensions, so that TileDB's global order is row-major: the coordinates below are
    # in that order (cells by ascending joinid), and TileDB writes them without sorting (it checks the order).
    layout = soma.TileDBCreateOptions(dims={"soma_dim_1": {"tile": width}})
    in_order = soma.TileDBWriteOptions(sort_coords=False)
    with soma.SparseNDArray.create(uri, type=pa.float32(), shape=(n_rows, width), platform_config=layout) as array:
        array.metadata[COMPLETE] = False
        for joinids, embeddings in _blocks(chunks, max(WRITE_BLOCK_VALUES // width, 1)):
            coordinates = {
                "soma_dim_0": np.repeat(joinids, width),
                "soma_dim_1": np.tile(np.arange(width, dtype=np.int64), joinids.size),
                "soma_data": embeddings.ravel(),
            }
            array.write(pa.table(coordinates), platform_config=in_order)
            written += joinids.size
    with soma.open(uri, mode="w") as array:  # the last write: the array is complete
        array.metadata[EMBEDDING_INFO] = json.dumps(info | {"n_embeddings": written, "n_features": width})
        array.metadata[COMPLETE] = True
    return written


def _blocks(chunks: Iterable[tuple[np.ndarray, np.ndarray]], cells: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The chunks' cells that have an embedding, regrouped into blocks of about ``cells`` cells."""
    joinids, embeddings, held = [], [], 0
    for ids, values in chunks:
        present = ~np.isnan(values).any(axis=1)
        joinids.append(ids[present])
        embeddings.append(np.asarray(values[present], dtype=np.float32))
        held += int(present.sum())
        if held >= cells:
            yield np.concatenate(joinids), np.concatenate(embeddings)
            joinids, embeddings, held = [], [], 0
    if held:
        yield np.concatenate(joinids), np.concatenate(embeddings)


def _move_into_place(written: Path, path: Path) -> None:
    """Rename the complete array ``written`` to ``path``, replacing an array there only at the very end."""
    aside = temporary_array_of(path, os.getpid(), TEMPORARY_SUFFIXES[1])
    if path.exists():
        os.replace(path, aside)
    os.replace(written, path)
    shutil.rmtree(aside, ignore_errors=True)
