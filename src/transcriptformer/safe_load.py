"""Reading files without running code from them (see ``SECURITY.md``): every file format that can carry code.

Pickle-based files (torch's ``.pt`` and Lightning's ``.ckpt``, NumPy's ``.npz``) and zarr stores (whose metadata may
name the ``pickle`` codec) can run code when they are read. The package reads all of them here:

- torch files with ``torch.load(weights_only=True)`` passed explicitly, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
  cannot turn off (it only changes calls that leave ``weights_only`` unset);
- ``.npz`` files with ``allow_pickle=False``;
- zarr stores only after their metadata was checked for the ``pickle`` codec, which
  ``NUMCODECS_ALLOW_UNSAFE_PICKLE_DECODE`` would otherwise enable;
- safetensors files (a format that holds no code) have their header checked before a library reads them.

A refused or unreadable file raises :class:`~transcriptformer.errors.UserError` with one line naming the file. torch
and NumPy are imported by the functions that use them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transcriptformer.errors import UserError

if TYPE_CHECKING:
    import numpy as np

# The zarr metadata documents (format 2: arrays, consolidated; format 3: every node) that name codecs.
ZARR_METADATA_FILES = (".zarray", ".zmetadata", "zarr.json")


class UnsafeFileError(UserError, ValueError):
    """A file holds Python objects whose unpickling could run code; it was refused, nothing of it ran."""


def load_torch_file(path: str | Path, *, what: str, fix: str, allowed_globals: Sequence[type] = ()) -> Any:
    """Unpickle a torch file safely: tensors, containers and numbers only, onto the CPU.

    Parameters
    ----------
    path
        The file (``torch.save`` format).
    what
        What the file is, for messages, e.g. ``"model weights"``.
    fix
        How the user can fix a refused or unreadable file, for messages.
    allowed_globals
        Further classes the file may hold (torch's ``safe_globals``), e.g. ``argparse.Namespace`` of settings.

    Raises
    ------
    UnsafeFileError
        When the file holds any other Python object.
    UserError
        When it is empty, truncated or not a torch file.
    """
    import torch

    if Path(path).is_dir():
        raise UserError(f"{path} is a folder, not a file of {what}; {fix}")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err) and _refused_object(err):
            raise UnsafeFileError(
                f"{path}: refusing to unpickle {what}: it holds {_refused_object(err)} besides tensors and settings, "
                f"and unpickling it could run code; {fix}"
            ) from None
        raise _unreadable(path, what, fix) from err
    except (EOFError, KeyError, IndexError, RuntimeError) as err:  # empty, text (KeyError, IndexError), truncated
        raise _unreadable(path, what, fix) from err


def load_npz(path: str | Path, *, what: str, fix: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read with ``allow_pickle=False``.

    Raises
    ------
    UnsafeFileError
        When the file holds pickled objects (object arrays, or a pickle instead of an archive).
    UserError
        When it is empty, truncated or not an ``.npz`` archive.
    """
    import numpy as np

    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise _unreadable(path, what, fix)  # a single .npy array
        with archive:
            return dict(archive)
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise UnsafeFileError(
                f"{path}: refusing to unpickle {what}: it holds pickled Python objects, and unpickling them could "
                f"run code; {fix}"
            ) from None
        raise _unreadable(path, what, fix) from err
    except (EOFError, zipfile.BadZipFile) as err:
        raise _unreadable(path, what, fix) from err


def check_safetensors(path: str | Path, *, what: str, fix: str) -> None:
    """Check that ``path`` is a safetensors file (a format that holds tensors and no code) before it is read.

    Raises
    ------
    UserError
        When its header cannot be read (another format, e.g. a pickle, or a truncated file).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except SafetensorError as err:
        raise UserError(f"{path}: {what} is not a readable safetensors file ({_first_line(err)}); {fix}") from err


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB blocks: what a file holds, to check that it was not replaced."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def check_zarr_store(path: str | Path) -> None:
    """Refuse a zarr store any of whose arrays is encoded with the ``pickle`` codec, before zarr reads it.

    Every metadata document is checked (consolidated ones included), so whichever zarr reads, it names no pickle.

    Raises
    ------
    UnsafeFileError
        When a metadata document names the ``pickle`` codec.
    UserError
        When a metadata document is not JSON.
    """
    visited: set[str] = set()
    for folder, subfolders, files in os.walk(path, followlinks=True):  # zarr follows links too
        if os.path.realpath(folder) in visited:
            subfolders.clear()  # a link back into the store
            continue
        visited.add(os.path.realpath(folder))
        for name in ZARR_METADATA_FILES:
            if name not in files:
                continue
            document = Path(folder) / name
            metadata = _read_json(document)
            if any(codec.rsplit(".", 1)[-1].lower() == "pickle" for codec in _codec_names(metadata)):
                raise UnsafeFileError(
                    f"{document}: refusing to read {path}: it encodes data with the 'pickle' codec, and unpickling "
                    "could run code; write the store again with anndata (adata.write_zarr), which never uses it"
                )
            if name == ".zarray" or (isinstance(metadata, dict) and metadata.get("node_type") == "array"):
                subfolders.clear()  # an array's chunks: format 2 nested chunks, format 3 "c/"


def _read_json(document: Path) -> Any:
    try:
        return json.loads(document.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{document}: not a readable zarr metadata file ({err}); write the store again") from err


def _codec_names(node: Any) -> Iterator[str]:
    """The ``id`` (format 2) and ``name`` (format 3) of every codec in a metadata document, user attributes aside."""
    if isinstance(node, dict):
        for key in ("id", "name"):
            if isinstance(node.get(key), str):
                yield node[key]
        for key, value in node.items():
            if key != "attributes" and not key.endswith(".zattrs"):
                yield from _codec_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _codec_names(value)


def _refused_object(err: pickle.UnpicklingError) -> str | None:
    """What torch's weights-only unpickler refused, e.g. ``the Python object os.system``.

    ``None`` when the refused "global" is no Python name: a text file starting with ``c`` reads as one.
    """
    match = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
    if not match:
        return "Python objects"
    name = match.group(1)
    return f"the Python object {name}" if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name) else None


def _unreadable(path: str | Path, what: str, fix: str) -> UserError:
    return UserError(f"{path}: cannot read {what}: the file is empty, truncated or of another format; {fix}")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__
