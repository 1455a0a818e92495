"""``annotate``: labels of a labelled reference transferred to query cells, with a confidence and ``Unknown``.

The reference is a :class:`~transcriptformer.annotation.ReferenceIndex` (built from embeddings, or loaded from a
saved folder); the query cells are the engine's rows. From a checkpoint, each work unit's cells are embedded by the
batch loop and labelled at once (:meth:`AnnotateTask.run_unit`: a resumed run keeps the labelled units); from
precomputed embeddings (an ``obsm`` key), :func:`annotate_embeddings` runs the same steps on them without a model.
Once every cell is labelled, :meth:`AnnotateTask.finish` summarises the labels (cells per predicted label, the share
called Unknown) and, with a column of true labels, scores them (macro F1 as ``transcriptformer evaluate``); the
summary table and the figures (a joint UMAP of reference and query, a confusion matrix) are written beside the
output in its one atomic write (:meth:`AnnotateTask.write_files`).

The command line reads :class:`AnnotateTaskConfig` before torch, so the heavy imports wait for a run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from transcriptformer.annotation.settings import UNKNOWN, AnnotateConfig
from transcriptformer.engine.config import RunConfig, default_output_path
from transcriptformer.engine.task import BatchLoopTask, Part
from transcriptformer.tasks.embed import EmbedConfig

if TYPE_CHECKING:
    import anndata as ad

    from transcriptformer.annotation import ReferenceIndex
    from transcriptformer.data.tokenize import TokenizedCells
    from transcriptformer.engine.run import MemoryResult
    from transcriptformer.engine.session import Session, WorkUnit
    from transcriptformer.pipeline import GeneOutputs, MemoryLimit

EMBEDDINGS = "embeddings"  # the model output the query is labelled from (obsm["embeddings"], as inference writes)
UNS_KEY = "annotation"
SUMMARY_FILE = "annotation_summary.csv"
UMAP_FILE = "annotation_umap.png"
CONFUSION_FILE = "annotation_confusion.png"
FIGURE_QUERY_CELLS = 20_000  # query cells (sampled) in the joint UMAP
FIGURE_REFERENCE_CELLS = 10_000  # reference cells (sampled) in the joint UMAP
NO_LABEL = ""  # a query cell without a label (no usable embedding) in a saved part; NaN in the output


def predicted_column(key: str) -> str:
    """The obs column of the labels predicted for ``key``."""
    return f"predicted_{key}"


def confidence_column(key: str) -> str:
    """The obs column of the confidence of the labels predicted for ``key``."""
    return f"{key}_confidence"


@dataclass
class AnnotateTaskConfig:
    """The settings of the annotate task (how the reference is indexed: :class:`AnnotateConfig`, in the index).

    Attributes
    ----------
    label_keys : list of str
        The reference's label columns transferred; they name the query's ``predicted_<key>`` and
        ``<key>_confidence`` columns.
    reject : bool
        Call ``"Unknown"`` the query cells below each key's threshold (chosen on the reference); ``False``: every
        cell gets its neighbour vote's winner.
    true_key : str or None
        A query obs column of true labels: the first label key's predictions are scored against it (macro F1,
        accuracy, confusion matrix).
    figures : bool
        Write the joint UMAP (and the confusion matrix) beside the output.
    index_id : str
        Identity of the reference index (its files' SHA-256): part of a resumed run's description.
    output_filename : str
        The annotated query's file name.
    """

    label_keys: list[str] = field(default_factory=list)
    reject: bool = AnnotateConfig.reject
    true_key: str | None = None
    figures: bool = True
    index_id: str = ""
    output_filename: str = "annotated.h5ad"

    def run_defaults(self) -> RunConfig:
        """The settings of an annotate run before flags change them: the embeddings, into ``output_filename``."""
        return RunConfig().replace(
            output_path=default_output_path("annotate"), output_filename=self.output_filename, output_keys=[EMBEDDINGS]
        )


@dataclass
class AnnotateTask(BatchLoopTask):
    """Each query cell's embedding (the batch loop), then the labels its reference neighbours vote for.

    ``index_dir`` is the saved reference index that every process loads once; the process that built it may hand
    it over as ``reference`` (not sent to other processes).
    """

    name: str = "annotate"
    settings: AnnotateTaskConfig = field(default_factory=AnnotateTaskConfig)
    index_dir: str = ""
    reference: ReferenceIndex | None = field(default=None, repr=False, compare=False)
    _figure_query: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        """Picklable for other processes: the FAISS index is loaded again from ``index_dir`` there."""
        return self.__dict__ | {"reference": None, "_figure_query": None}

    def index(self) -> ReferenceIndex:
        """The reference index, loaded from ``index_dir`` at the first call of this process."""
        if self.reference is None:
            from transcriptformer.annotation import ReferenceIndex

            self.reference = ReferenceIndex.load(self.index_dir)
        return self.reference

    def check(self, config: RunConfig) -> None:
        """The embeddings must be computed; the true labels' column must be kept."""
        if EMBEDDINGS not in config.predict.output_keys:
            raise ValueError(f"the query is labelled from its {EMBEDDINGS}: add {EMBEDDINGS} to output_keys")
        obs_keys = config.output.obs_keys
        if self.settings.true_key and obs_keys != ["all"] and self.settings.true_key not in obs_keys:
            raise ValueError(f"true_key {self.settings.true_key!r} is not among obs_keys {obs_keys}; keep it")

    def check_plan(self, session: Session) -> None:
        """The query's obs holds ``true_key`` (checked once the inputs are open, before any cell is embedded)."""
        for file in session.files:
            check_true_key(self.settings.true_key, file.obs_columns)

    def added_obs_columns(self) -> tuple[str, ...]:
        """``predicted_<key>`` and ``<key>_confidence`` of each label key."""
        return tuple(c for key in self.settings.label_keys for c in (predicted_column(key), confidence_column(key)))

    def run_unit(
        self,
        session: Session,
        unit: WorkUnit,
        cells: TokenizedCells,
        on_batch: Callable[[int], object],
        limit: MemoryLimit,
    ) -> Part:
        """The unit's embeddings (the batch loop) and the labels of its cells."""
        part = super().run_unit(session, unit, cells, on_batch, limit)
        embeddings = part.outputs.cell_values[EMBEDDINGS]
        part.outputs.cell_values.update(self.label_cells(embeddings, session.weights_sha256))
        return part

    def label_cells(self, embeddings: np.ndarray, model_id: str | None) -> dict[str, np.ndarray]:
        """Per label key, the predicted labels (a unicode array, ``""`` for none) and confidences of the cells."""
        predictions = self.index().annotate(embeddings, model_id=model_id, reject=self.settings.reject)
        values = {}
        for key in self.settings.label_keys:
            labels = predictions[predicted_column(key)].astype(object).fillna(NO_LABEL)
            values[predicted_column(key)] = labels.to_numpy(dtype=str)
            values[confidence_column(key)] = predictions[confidence_column(key)].to_numpy()
        return values

    def finish(self, obs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
        """The predicted labels as categories (NaN: none); the summary and, with ``true_key``, the scores as uns."""
        index = self.index()
        obs = obs.copy()
        for table in index.labels:
            if table.key in self.settings.label_keys:
                column = obs[predicted_column(table.key)].astype(str).replace(NO_LABEL, np.nan)
                obs[predicted_column(table.key)] = pd.Categorical(column, categories=[*table.classes, UNKNOWN])
        record = {
            "label_keys": list(self.settings.label_keys),
            "reject": self.settings.reject,
            "reference": reference_record(index),
            "summary": summary_record(obs, self.settings.label_keys),
        }
        if self.settings.true_key:
            record["evaluation"] = evaluate(obs, self.settings.true_key, self.settings.label_keys[0])
        return obs, {UNS_KEY: record}

    def summarize(self, obs: pd.DataFrame, outputs: Iterable[GeneOutputs], genes: pd.Index) -> dict:
        """No uns entry; keeps a sample of query embeddings for the UMAP of :meth:`write_files`."""
        if self.settings.figures:
            sample = np.sort(np.random.default_rng(0).permutation(len(obs))[:FIGURE_QUERY_CELLS])
            rows, start = [], 0
            for chunk in outputs:
                values = chunk.cell_values[EMBEDDINGS]
                inside = sample[(sample >= start) & (sample < start + len(values))]
                rows.append(values[inside - start])
                start += len(values)
            labels = obs[predicted_column(self.settings.label_keys[0])].to_numpy()[sample]
            self._figure_query = (np.concatenate(rows), labels)
        return {}

    def output_files(self, config: RunConfig | None = None) -> tuple[str, ...]:
        """The summary table, and the figures unless ``figures`` is off."""
        figures = (UMAP_FILE, *((CONFUSION_FILE,) if self.settings.true_key else ())) if self.settings.figures else ()
        return (SUMMARY_FILE, *figures)

    def write_files(self, folder: Path, obs: pd.DataFrame, uns: dict) -> None:
        """The summary table (and the figures) into ``folder``."""
        record = uns[UNS_KEY]
        summary_table(record).to_csv(folder / SUMMARY_FILE, index=False)
        if self.settings.figures:
            from transcriptformer.annotation.figures import confusion_figure, joint_umap_figure

            query, labels = self._figure_query
            joint_umap_figure(reference_sample(self.index()), query, labels, self.index().settings.metric).savefig(
                folder / UMAP_FILE, dpi=120, bbox_inches="tight"
            )
            if "evaluation" in record:
                truth = obs[self.settings.true_key]
                predicted = obs[predicted_column(self.settings.label_keys[0])]
                confusion_figure(truth, predicted).savefig(folder / CONFUSION_FILE, dpi=120, bbox_inches="tight")

    def describe(self, uns: dict) -> list[str]:
        """One line per label key, and the scores against ``true_key``."""
        return describe(uns[UNS_KEY])

    def write_into(self, adata: ad.AnnData, result: MemoryResult) -> None:
        """Predictions into obs, the summary into ``uns["annotation"]``, the embeddings into ``obsm``."""
        super().write_into(adata, result)
        adata.obsm[EmbedConfig.key_added] = result.outputs.cell_values[EMBEDDINGS]


def reference_record(index: ReferenceIndex) -> dict:
    """What the query was labelled against: the index's size, search, model and thresholds."""
    return {
        "cells": index.n_cells,
        "dimension": index.dimension,
        "metric": index.settings.metric,
        "n_neighbors": index.settings.n_neighbors,
        "exact": bool(index.exact),
        "model_id": index.model_id or "",
        "thresholds": {key: value.threshold for key, value in index.calibration.items()},
    }


def summary_record(obs: pd.DataFrame, label_keys: list[str]) -> dict:
    """Per label key, :func:`~transcriptformer.annotation.summarize`'s figures, counts as two lists (h5ad-safe)."""
    from transcriptformer.annotation import summarize

    columns = [c for key in label_keys for c in (predicted_column(key), confidence_column(key))]
    summary = summarize(obs[columns])
    for values in summary.values():
        counts = values.pop("counts")
        values["labels"], values["label_cells"] = list(counts), list(counts.values())
    return summary


def check_true_key(true_key: str | None, columns: Sequence[str]) -> None:
    """Raise a ``ValueError`` when ``true_key`` is given and not among the query's obs ``columns``."""
    if true_key and true_key not in columns:
        raise ValueError(f"true_key {true_key!r} is not a column of the query's obs; choose among {list(columns)[:20]}")


def evaluate(obs: pd.DataFrame, true_key: str, label_key: str) -> dict:
    """Accuracy and macro F1 of the predictions against ``obs[true_key]`` (F1 as ``evaluate``: binary for 2 classes).

    The F1 is averaged over the true labels; a cell called Unknown counts as a miss of its true label (Unknown is no
    class of its own). Cells without a true label are left out.
    """
    from sklearn.metrics import accuracy_score, f1_score

    check_true_key(true_key, obs.columns)
    truth, predicted = obs[true_key], obs[predicted_column(label_key)]
    scored = truth.notna().to_numpy() & predicted.notna().to_numpy()
    truth, predicted = truth[scored].astype(str).to_numpy(), predicted[scored].astype(str).to_numpy()
    classes, nan = np.unique(truth), float("nan")
    average = "binary" if len(classes) == 2 else "macro"
    positive = {"pos_label": classes[1]} if average == "binary" else {"labels": classes}
    f1 = float(f1_score(truth, predicted, average=average, zero_division=0, **positive)) if scored.any() else nan
    return {
        "true_key": true_key,
        "label_key": label_key,
        "cells": int(scored.sum()),
        "accuracy": float(accuracy_score(truth, predicted)) if scored.any() else nan,
        "macro_f1": f1,
    }


def summary_table(record: dict) -> pd.DataFrame:
    """One row per label key and predicted label: cells and share of the labelled query cells."""
    rows = []
    for key, values in record["summary"].items():
        for label, cells in zip(values["labels"], values["label_cells"], strict=True):
            share = cells / values["labelled"] if values["labelled"] else 0.0
            rows.append({"label_key": key, "predicted": label, "cells": cells, "share": share})
    return pd.DataFrame(rows, columns=["label_key", "predicted", "cells", "share"])


def describe(record: dict) -> list[str]:
    """Lines about an annotation's ``uns["annotation"]`` record."""
    lines = []
    for key, values in record["summary"].items():
        pairs = zip(values["labels"][:5], values["label_cells"][:5], strict=True)
        top = ", ".join(f"{label} {n}" for label, n in pairs)
        lines.append(
            f"{key}: {values['labelled']} of {values['cells']} cells labelled, {values['unknown']} {UNKNOWN} "
            f"({values['unknown_rate']:.1%}), mean confidence {values['mean_confidence']:.3f}; {top}"
        )
    if "evaluation" in record:
        scores = record["evaluation"]
        lines.append(
            f"against {scores['true_key']} ({scores['cells']} cells): macro F1 {scores['macro_f1']:.4f}, "
            f"accuracy {scores['accuracy']:.4f}"
        )
    return lines


def reference_sample(index: ReferenceIndex) -> np.ndarray:
    """Up to ``FIGURE_REFERENCE_CELLS`` reference vectors read back from the index (unit length for cosine)."""
    ids = np.sort(np.random.default_rng(0).permutation(index.n_cells)[:FIGURE_REFERENCE_CELLS])
    return index.index.reconstruct_batch(ids.astype(np.int64))


def annotate_embeddings(task: AnnotateTask, obs: pd.DataFrame, embeddings: np.ndarray, model_id: str | None) -> dict:
    """Label precomputed query embeddings with the task's steps; returns the uns entries and sets ``obs``'s columns.

    ``obs`` (the query's) gets ``predicted_<key>`` and ``<key>_confidence`` in place.
    """
    from transcriptformer.pipeline import GeneOutputs

    added = task.label_cells(embeddings, model_id)
    finished, uns = task.finish(pd.DataFrame(added, index=obs.index).join(obs))
    for column in added:
        obs[column] = finished[column]
    task.summarize(finished, [GeneOutputs(len(obs), {EMBEDDINGS: embeddings})], pd.Index([]))
    return uns


def settings_of(args: Any) -> AnnotateConfig:
    """:class:`AnnotateConfig` of the flags named like its fields (the others keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(AnnotateConfig) if hasattr(args, f.name)}
    return AnnotateConfig(**{k: v for k, v in given.items() if v is not None})
