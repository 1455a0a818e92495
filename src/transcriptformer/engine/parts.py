"""Saved unit outputs: what makes an interrupted run resumable.

Each finished work unit's outputs are saved as ``.<output name>.parts/unit-NNNNNN.npz`` beside the output file,
with a manifest (``run.json``) describing the run: its settings, its inputs, and the contents (SHA-256) of the
weights, the adapter's files and the gene-embedding tables. ``--resume`` continues only a run with the same
description, naming what changed otherwise; it checks the saved units before running anything, and skips them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from transcriptformer.checkpoint import WEIGHTS_FILE
from transcriptformer.engine.session import Session, WorkUnit
from transcriptformer.engine.task import Part, task_description
from transcriptformer.errors import UserError
from transcriptformer.model.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from transcriptformer.pipeline import GeneOutputs
from transcriptformer.safe_load import load_npz, sha256_of

MANIFEST = "run.json"
OBS_INDEX = "obs_index"  # the row names of a part with rows of its own (Part.obs)
ROW_CELLS = "row_cells"  # each such row's input cell, its position among the unit's cells (Part.cells)
# Settings that change how a run is carried out but not its results; a resumed run may change them.
RESUMABLE_CHANGES = (
    "output.overwrite",
    "output.resume",
    "hardware.n_data_workers",
    "hardware.num_gpus",
    "input.use_oom_dataloader",
    "output.output_format",
    "output.output_soma",
    "input.soma_block_cells",
)


def parts_dir(session: Session) -> Path:
    """Where units' outputs wait to be merged."""
    return session.output_file.with_name(f".{session.output_file.name}.parts")


def part_file(session: Session, unit: WorkUnit) -> Path:
    """The saved outputs of one unit."""
    return parts_dir(session) / f"unit-{unit.index:06d}.npz"


def save_part(part: Part, path: Path) -> None:
    """Write a unit's outputs to an ``.npz`` file, through a hidden temporary name: a partial file never exists.

    Strings are stored as fixed-width unicode arrays, so that the file is read without unpickling anything.
    """
    outputs = part.outputs
    arrays = {"n_cells": np.array(outputs.n_cells)}
    arrays |= {f"cell/{k}": v for k, v in outputs.cell_values.items()}
    for key, matrix in outputs.gene_values.items():
        arrays |= {
            f"gene/{key}/data": matrix.data,
            f"gene/{key}/indices": matrix.indices,
            f"gene/{key}/indptr": matrix.indptr,
            f"gene/{key}/shape": np.array(matrix.shape),
        }
    arrays |= {f"cge/{k}": v for k, v in outputs.cge.items()}
    arrays = {name: _storable(values, name) for name, values in arrays.items()}
    if part.obs is not None:
        arrays |= {OBS_INDEX: _storable(part.obs.index.to_numpy(), "obs index")}
        arrays |= {f"obs/{c}": _storable(part.obs[c].to_numpy(), f"obs column {c}") for c in part.obs.columns}
    if part.cells is not None:
        arrays[ROW_CELLS] = np.asarray(part.cells, dtype=np.int64)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise write_failed(path, error, path.parent) from error


def write_failed(target: Path | str, error: OSError, folder: Path, fix: str = "free disk space") -> UserError:
    """The error of a write that failed (a full disk, a quota): nothing was replaced and the saved units remain."""
    return UserError(
        f"writing {target} failed ({error.strerror or error}); nothing was replaced, and the finished units are kept "
        f"in {folder}: {fix} and rerun with `resume=True`"
    )


# What reading a damaged .npz file raises: not a zip file, truncated, a member missing or failing its CRC.
DAMAGED_PART_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


def _storable(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` as an array that ``.npz`` stores without pickling: strings (objects) as a unicode array."""
    values = np.asarray(values)
    if values.dtype.kind != "O":
        return values
    if not all(isinstance(v, str) for v in values.ravel()):
        raise TypeError(f"{name}: a saved unit holds numbers, booleans or strings, not Python objects")
    return values.astype(str)


def load_part(path: Path) -> Part:
    """Read a file written by :func:`save_part` (no pickled objects are accepted)."""
    fix = "delete it and rerun with `resume=True` (only its cells are computed again)"
    arrays = load_npz(path, what="a saved unit of the interrupted run", fix=fix)
    obs, cells = None, arrays.pop(ROW_CELLS, None)
    if OBS_INDEX in arrays:
        index = pd.Index(arrays.pop(OBS_INDEX).astype(object))
        columns = {name[len("obs/") :]: arrays.pop(name) for name in list(arrays) if name.startswith("obs/")}
        obs = pd.DataFrame({c: v.astype(object) if v.dtype.kind == "U" else v for c, v in columns.items()}, index=index)
    outputs = GeneOutputs(n_cells=int(arrays.pop("n_cells")))
    outputs.cell_values = {name[len("cell/") :]: v for name, v in arrays.items() if name.startswith("cell/")}
    outputs.cge = {name[len("cge/") :]: v for name, v in arrays.items() if name.startswith("cge/")}
    for key in {name.split("/")[1] for name in arrays if name.startswith("gene/")}:
        parts = [arrays[f"gene/{key}/{p}"] for p in ("data", "indices", "indptr")]
        outputs.gene_values[key] = sp.csr_matrix(tuple(parts), shape=tuple(arrays[f"gene/{key}/shape"]))
    outputs.cell_values = {k: v.astype(object) if v.dtype.kind == "U" else v for k, v in outputs.cell_values.items()}
    return Part(outputs, obs, cells)


def damaged_parts_error(described: list[str], folder: Path) -> UserError:
    """The error for saved units that cannot be read, ``described`` as ``"<file name> (<reason>)"``."""
    return UserError(
        f"saved unit(s) in {folder} are damaged: {', '.join(described)}; delete those files and rerun with "
        "`resume=True` (only their cells are computed again)"
    )


def _reason(error: BaseException) -> str:
    if "pickled" in str(error):  # numpy's advice to load it unsafely is not repeated
        return "it holds pickled Python objects, which are never unpickled"
    return str(error.args[0] if isinstance(error, KeyError) and error.args else error) or type(error).__name__


def part_problem(path: Path, n_cells: int | None) -> str | None:
    """What is wrong with the saved unit ``path`` of ``n_cells`` rows (``None``: rows of its own), or ``None``.

    Reads the file's zip directory and its row count, not its arrays: a truncated or foreign file is found at once,
    a corrupted array when it is merged (:func:`load_part`).
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            saved = int(npz["n_cells"])
    except DAMAGED_PART_ERRORS as error:
        return _reason(error)
    return None if n_cells is None or saved == n_cells else f"{saved} cells instead of {n_cells}"


def check_saved_parts(session: Session) -> int:
    """The number of units already saved, after checking that each one can be read.

    Raises
    ------
    UserError
        Naming the damaged files, and how to compute their cells again.
    """
    saved = {unit: path for unit in session.units if (path := part_file(session, unit)).exists()}
    damaged = [
        f"{path.name} ({problem})"
        for unit, path in saved.items()
        if (problem := part_problem(path, unit.stop - unit.start if session.task.rows_are_cells else None))
    ]
    if damaged:
        raise damaged_parts_error(damaged, parts_dir(session))
    return len(saved)


def weight_files(session: Session) -> list[Path]:
    """The files of weights a run reads: the checkpoint's weights, the adapter's files, the gene-embedding tables."""
    model = session.config.model
    adapter = Path(model.adapter) if model.adapter else None
    return [
        session.checkpoint.path / WEIGHTS_FILE,
        *([adapter / ADAPTER_CONFIG_FILE, adapter / ADAPTER_WEIGHTS_FILE] if adapter else []),
        *map(Path, model.pretrained_embedding),
    ]


def run_description(session: Session) -> dict:
    """What a run computes: its task and settings, its inputs (``InputFile.identity``), its files of weights by content.

    The contents (SHA-256) of :func:`weight_files` are described, not only their paths: a file rewritten in place
    is a different run.
    """
    settings = session.config.to_dict()
    for key in RESUMABLE_CHANGES:
        section, name = key.split(".")
        settings[section].pop(name)
    inputs = {f.name: f.identity for f in session.files}
    weights, *others = weight_files(session)
    contents = {str(weights.resolve()): session.weights_sha256} | {str(p.resolve()): sha256_of(p) for p in others}
    description = {"task": task_description(session.task), "settings": settings, "inputs": inputs, "contents": contents}
    return json.loads(json.dumps(description, default=str))


def run_fingerprint(description: dict) -> str:
    """SHA-256 of a :func:`run_description`."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def describe_changes(before: dict, after: dict) -> list[str]:
    """What differs between two :func:`run_description`: the task's settings, setting keys, inputs, files of weights."""
    settings_before, settings_after = _leaves(before.get("settings", {})), _leaves(after["settings"])
    sections = [
        ("task {}", _leaves(before.get("task", {})), _leaves(after["task"])),
        ("setting {}", settings_before, settings_after),
        ("input {} (size or modification time, or the cells of its query)", before.get("inputs", {}), after["inputs"]),
        ("contents of {}", before.get("contents", {}), after["contents"]),
    ]
    return [
        label.format(key)
        for label, old, new in sections
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def _leaves(tree: dict, prefix: str = "") -> dict:
    """``{"a.b": value}`` for the nested ``{"a": {"b": value}}``."""
    leaves = {}
    for key, value in tree.items():
        leaves |= _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return leaves


def read_manifest(manifest: Path) -> dict:
    """The manifest of an interrupted run; a ``UserError`` when it cannot be read."""
    try:
        content = json.loads(manifest.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{manifest} is unreadable ({error}); run without `resume` to start over") from error
    if not isinstance(content, dict):
        raise UserError(f"{manifest} is not a run's manifest; run without `resume` to start over")
    return content


def open_parts_dir(session: Session) -> int:
    """Start the directory of unit outputs afresh, or check that it belongs to the run being resumed.

    When resuming, the saved units are checked too (:func:`check_saved_parts`), before anything is computed.

    Returns
    -------
    int
        The number of units already done (0 for a fresh start).

    Raises
    ------
    UserError
        The interrupted run differs (the message names what changed), its manifest or saved units are damaged.
    """
    folder = parts_dir(session)
    manifest = folder / MANIFEST
    description = run_description(session)
    fingerprint = run_fingerprint(description)
    if session.config.output.resume and manifest.exists():
        interrupted = read_manifest(manifest)
        if interrupted.get("fingerprint") != fingerprint:
            changes = describe_changes(interrupted["run"], description) if "run" in interrupted else []
            raise UserError(
                f"the interrupted run in {folder} had other settings, inputs or weights; run without `resume` to "
                f"start over" + (f" (changed: {'; '.join(changes)})" if changes else "")
            )
        return check_saved_parts(session)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    content = {"fingerprint": fingerprint, "run": description}
    if session.config.input.reads_soma:
        content["unit_soma_joinids"] = unit_joinid_ranges(session)
    manifest.write_text(json.dumps(content))
    return 0


def unit_joinid_ranges(session: Session) -> list[list[int]]:
    """First and last ``soma_joinid`` of each unit's cells (a SOMA input), in unit order: what each unit holds."""
    return [[int(j[0]), int(j[-1])] for j in map(session.unit_joinids, session.units)]


def units_to_run(session: Session, units: list[WorkUnit]) -> list[WorkUnit]:
    """``units`` without those already saved when resuming."""
    if not session.config.output.resume:
        return units
    return [unit for unit in units if not part_file(session, unit).exists()]
