"""Opening HDF5 files (``.h5ad``, 10x ``.h5``, gene-embedding tables) with errors that name the file and the fix.

h5py reports a file that is not HDF5, or a truncated one, in HDF5's words (``Unable to synchronously open file
(file signature not found)``) without the file's name; :func:`open_hdf5` says which file and what to do.
It imports nothing heavy, so that the modules of the command line that read vocabularies stay light.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py

from transcriptformer.errors import UserError


def open_hdf5(path: str | Path, kind: str) -> h5py.File:
    """Open an HDF5 file for reading; a folder, or a file that is not HDF5 or is truncated, is a :class:`UserError`.

    Parameters
    ----------
    path
        The file.
    kind
        What the file should be, for the message, e.g. ``"an AnnData .h5ad file"``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not {kind}; pass the file itself")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"cannot read {path} as {kind}: {_hdf5_problem(err)}") from err


def _hdf5_problem(error: OSError) -> str:
    """What h5py's message on opening a file means, with what to do about it."""
    message = str(error).splitlines()[0]
    truncated = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", message)
    if truncated:
        return f"the file is truncated ({truncated.group(1)} of {truncated.group(2)} bytes); copy or download it again"
    if "file signature not found" in message:
        return "it is not an HDF5 file (no HDF5 signature); check the path, or write the file again"
    return message
