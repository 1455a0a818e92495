"""Saved unit outputs: what makes an interrupted run resumable.

Each finished work unit's outputs are saved as ``.<output name>.parts/unit-NNNNNN.npz`` beside the output file,
with a manifest (``run.json``) holding the run's fingerprint: its settings, inputs and weights. ``--resume``
continues only a run with the same fingerprint, and skips the units already saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from transcriptformer.inference.session import Session, WorkUnit
from transcriptformer.pipeline import GeneOutputs
from transcriptformer.safe_load import load_npz

MANIFEST = "run.json"
# Settings that change how a run is carried out but not its results; a resumed run may change them.
RESUMABLE_CHANGES = ("overwrite", "resume", "n_data_workers", "num_gpus", "use_oom_dataloader")


def parts_dir(session: Session) -> Path:
    """Where units' outputs wait to be merged."""
    return session.output_file.with_name(f".{session.output_file.name}.parts")


def part_file(session: Session, unit: WorkUnit) -> Path:
    """The saved outputs of one unit."""
    return parts_dir(session) / f"unit-{unit.index:06d}.npz"


def save_part(outputs: GeneOutputs, path: Path) -> None:
    """Write a unit's outputs to an ``.npz`` file, through a hidden temporary name: a partial file never exists."""
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
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as f:
        np.savez(f, **arrays)
    os.replace(temporary, path)


def load_part(path: Path) -> GeneOutputs:
    """Read a file written by :func:`save_part` (no pickled objects are accepted)."""
    arrays = load_npz(path, what="a saved part of the interrupted run", fix="run without --resume to start over")
    outputs = GeneOutputs(n_cells=int(arrays.pop("n_cells")))
    outputs.cell_values = {name[len("cell/") :]: v for name, v in arrays.items() if name.startswith("cell/")}
    outputs.cge = {name[len("cge/") :]: v for name, v in arrays.items() if name.startswith("cge/")}
    for key in {name.split("/")[1] for name in arrays if name.startswith("gene/")}:
        parts = [arrays[f"gene/{key}/{p}"] for p in ("data", "indices", "indptr")]
        outputs.gene_values[key] = sp.csr_matrix(tuple(parts), shape=tuple(arrays[f"gene/{key}/shape"]))
    return outputs


def run_fingerprint(session: Session) -> str:
    """Identifies what a run computes: its settings, its inputs (path, size, mtime) and the weights."""
    settings = session.config.to_dict()
    for key in RESUMABLE_CHANGES:
        settings["model"]["inference_config"].pop(key)
    inputs = [(str(f.path.resolve()), f.path.stat().st_size, f.path.stat().st_mtime_ns) for f in session.files]
    described = json.dumps(
        {"settings": settings, "inputs": inputs, "weights": session.weights_sha256}, sort_keys=True, default=str
    )
    return hashlib.sha256(described.encode()).hexdigest()


def open_parts_dir(session: Session) -> int:
    """Start the directory of unit outputs afresh, or check that it belongs to the run being resumed.

    Returns
    -------
    int
        The number of units already done (0 for a fresh start).
    """
    folder = parts_dir(session)
    manifest = folder / MANIFEST
    fingerprint = run_fingerprint(session)
    if session.config.inference.resume and manifest.exists():
        if json.loads(manifest.read_text())["fingerprint"] != fingerprint:
            raise ValueError(
                f"the interrupted run in {folder} had other settings, inputs or weights; "
                "run without --resume to start over"
            )
        return sum(part_file(session, unit).exists() for unit in session.units)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    manifest.write_text(json.dumps({"fingerprint": fingerprint}))
    return 0


def units_to_run(session: Session, units: list[WorkUnit]) -> list[WorkUnit]:
    """``units`` without those already saved when resuming."""
    if not session.config.inference.resume:
        return units
    return [unit for unit in units if not part_file(session, unit).exists()]
