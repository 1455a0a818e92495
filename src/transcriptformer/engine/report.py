"""What a run tells its user and its output: the plan (``--dry-run``), the summary, and the run's metadata."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import torch

from transcriptformer.data.soma import experiment_name
from transcriptformer.engine.config import EMBEDDING_KEY
from transcriptformer.engine.session import Session
from transcriptformer.engine.task import task_description
from transcriptformer.pipeline import plan
from transcriptformer.version import __version__


def counted(count: int, noun: str) -> str:
    """``"1 process"``, ``"2 processes"``, ``"2 CPU threads"``."""
    return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith("s") else "s")


def describe_source(session: Session) -> str:
    """Where the cells come from: ``"3 files"``, ``"the SOMA experiment /data/census"``."""
    if session.config.input.reads_soma:
        return f"the SOMA experiment {session.files[0].name}"
    return counted(len(session.files), "file")


def describe_inputs(session: Session) -> list[str]:
    """One line per input file: cells, genes matched, the cells that the cell filters dropped, the empty cells."""
    return [
        f"  {f.name}: {len(f.cells)} cells, {f.n_matched} of {f.n_genes} genes in the vocabulary"
        + (f"; {f.cells.describe_dropped()}" if f.cells.n_dropped else "")
        + (f"; {f.cells.describe_empty()}" if f.cells.n_empty else "")
        for f in session.files
    ]


def count_batches(session: Session) -> int:
    """Forward passes the run will make (reads every unit's counts for their lengths)."""
    settings = session.config.predict
    return sum(len(plan(session.model, session.read_unit(u), settings, session.device)) for u in session.units)


def format_plan(session: Session, world_size: int) -> str:
    """What a run would do (``--dry-run``)."""
    config = session.config
    predict, output, model = config.predict, config.output, config.model
    per_batch = f"of up to {predict.batch_size} cells"
    if predict.max_tokens:
        per_batch = f"of at most {predict.max_tokens} tokens"
    embeddings = f", gene embeddings from {model.pretrained_embedding}" if model.pretrained_embedding else ""
    lines = [
        "Dry run: nothing is written.",
        f"Checkpoint: {model.checkpoint_path} ({model.model_type}, "
        f"{len(session.checkpoint.gene_vocab)} vocabulary entries{embeddings})",
        "Inputs:",
        *describe_inputs(session),
        f"Plan: {session.n_cells} cells in {count_batches(session)} batches {per_batch}, "
        f"{len(session.units)} unit(s) of up to {output.chunk_size} cells",
        f"Device: {session.device.type} ({counted(world_size, 'process')}), precision {session.precision}",
        f"Outputs: {', '.join(predict.output_keys)}",
        *([f"Output file: {session.output_file}{existing_output_note(session)}"] if output.writes_h5ad else []),
        *([f"SOMA output: {output.output_soma} (cell embeddings)"] if output.writes_soma else []),
    ]
    return "\n".join(lines)


def existing_output_note(session: Session) -> str:
    """What the run would do to an output file that already exists."""
    if not session.output_file.exists():
        return ""
    if session.config.output.overwrite:
        return " (exists; will be replaced)"
    return " (exists; the run would stop: pass `overwrite=True` to replace it)"


def format_summary(session: Session, world_size: int, seconds: float) -> str:
    """What a finished run did, and how to open its output (whose path the run prints last)."""
    path, output, task = session.output_file.resolve(), session.config.output, session.task
    embeddings = task.rows_are_cells and "embeddings" in task.output_keys(session.config)  # obsm of the cells
    lines = [
        f"{task.name.capitalize()} finished.",
        *describe_inputs(session),
        f"{session.n_cells} cells in {seconds:.1f} s ({session.n_cells / seconds:.1f} cells/s) on "
        f"{session.device.type} ({counted(world_size, 'process')}), precision {session.precision}",
    ]
    if output.writes_h5ad:
        lines.append(
            f'Open it with: adata = anndata.read_h5ad("{path}")'
            + (f'; sc.pp.neighbors(adata, use_rep="{EMBEDDING_KEY}")' if embeddings else "")
        )
    if output.writes_soma:
        lines.append(
            f'Read the embeddings with: tiledbsoma.open("{output.output_soma}").read().tables() (docs/scale.md)'
        )
    return "\n".join(lines)


def run_metadata(session: Session, world_size: int) -> dict:
    """``uns["transcriptformer"]``: checkpoint, versions, and the run's settings."""
    model = session.config.model
    metadata = {
        "package_version": __version__,
        "torch_version": str(torch.__version__),
        "anndata_version": importlib.metadata.version("anndata"),
        "checkpoint_path": str(session.checkpoint.path.resolve()),
        "weights_sha256": session.weights_sha256,
        "model_type": session.config.model.model_type,
        "device": session.device.type,
        "processes": world_size,
        "cpu_threads": torch.get_num_threads(),
        "precision": session.precision,
        "data_files": [f.name for f in session.files],
        "genes_in_file": np.array([f.n_genes for f in session.files]),
        "genes_matched": np.array([f.n_matched for f in session.files]),
        "config": json.dumps(session.config.to_dict()),
        "task": json.dumps(task_description(session.task)),
    }
    if any(f.cells.n_dropped for f in session.files):
        metadata["cells_dropped"] = np.array([f.cells.n_dropped for f in session.files])
    if any(f.cells.n_empty for f in session.files):
        metadata["cells_empty"] = np.array([f.cells.n_empty for f in session.files])
    if model.pretrained_embedding:
        metadata["pretrained_embedding"] = list(model.pretrained_embedding)
    if model.adapter:
        metadata["adapter"] = str(Path(model.adapter).resolve())
    if session.config.input.reads_soma:
        metadata["soma"] = {k: v for k, v in soma_query(session).items() if v is not None}
    return metadata


def soma_query(session: Session) -> dict:
    """Which cells of which SOMA experiment the run read."""
    inputs, reader = session.config.input, session.files[0].cells.reader
    return {
        "experiment_uri": reader.experiment_uri,
        "census_version": inputs.census_version,
        "organism": inputs.organism,
        "obs_filter": inputs.obs_filter,
        "measurement": inputs.soma_measurement,
        "x_layer": reader.x_layer,
    }


def embedding_info(session: Session) -> dict:
    """The SOMA array's ``CxG_embedding_info``: the Census' fields of a hosted embedding and the run's."""
    inputs, model = session.config.input, session.config.model
    checkpoint = session.checkpoint.path.resolve()
    organism = inputs.organism and experiment_name(inputs.organism)
    return {
        "id": f"transcriptformer-{checkpoint.name}-{session.weights_sha256[:12]}",
        "title": f"TranscriptFormer {checkpoint.name} cell embeddings ({model.model_type})",
        "description": "Cell embeddings computed with the transcriptformer package from the experiment's raw counts",
        "experiment_name": organism,
        "measurement_name": inputs.soma_measurement,
        "data_type": "obs_embedding",
        "census_version": inputs.census_version,
        "submission_date": datetime.date.today().isoformat(),
        "model_type": model.model_type,
        "checkpoint_path": str(checkpoint),
        "weights_sha256": session.weights_sha256,
        "adapter": str(Path(model.adapter).resolve()) if model.adapter else None,
        "pretrained_embedding": list(model.pretrained_embedding),
        "precision": session.precision,
        "package_version": __version__,
        "query": soma_query(session),
    }
