"""``predict-labels``: the classes of cells, from a classifier trained by ``finetune --task classify``.

The classifier is a head on the cell embedding, saved beside the LoRA adapters it was trained with
(:mod:`transcriptformer.model.classifier`). :class:`ClassifyTask` loads it and checks it against the checkpoint
before anything runs, computes each unit's cell embeddings with the batch loop, then the head's class
probabilities. With ``key`` the classifier's label key (e.g. ``cell_type``), every cell gets:

* ``obs["predicted_<key>"]``: the most probable class (categorical, categories the classes);
* ``obs["predicted_<key>_probability"]``: its probability;
* ``obsm["<key>_probabilities"]``: ``(n_cells, n_classes)`` the probabilities of every class;

and ``uns["<key>_probabilities"]`` holds the columns' class names (``classes``) and how many cells each class got
(``counts``). A cell without any count of the vocabulary's genes has NaN probabilities and no predicted class.

From files (``transcriptformer predict-labels``) these go to the run's ``.h5ad``, beside the input's obs; in
memory (:meth:`TranscriptFormerModel.classify <transcriptformer.api.TranscriptFormerModel.classify>`) into the
user's AnnData.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from transcriptformer.engine.task import BatchLoopTask, Part

if TYPE_CHECKING:
    from collections.abc import Callable

    import anndata as ad

    from transcriptformer.data.tokenize import TokenizedCells
    from transcriptformer.engine.config import RunConfig
    from transcriptformer.engine.run import MemoryResult
    from transcriptformer.engine.session import Session, WorkUnit
    from transcriptformer.model.classifier import Classifier
    from transcriptformer.pipeline import MemoryLimit

EMBEDDINGS = "embeddings"  # the model output the head reads


@dataclass
class ClassifyConfig:
    """What the classifier of a classify task is: read from its adapter folder when the task is checked.

    Part of the run's description, so that a resumed run with another classifier is refused.

    Attributes
    ----------
    label_key : str
        The obs column the classifier was trained to predict.
    classes : list of str
        Class names, in the order of the head's outputs.
    head_sha256 : str
        SHA-256 of the head's weights file (empty for a classifier given in memory).
    """

    label_key: str = ""
    classes: list[str] = field(default_factory=list)
    head_sha256: str = ""


@dataclass
class ClassifyTask(BatchLoopTask):
    """Cell embeddings through the batch loop, then the classifier's probabilities and predicted classes.

    Attributes
    ----------
    classifier : Classifier or None
        The loaded classifier (the Python API's); ``None``: loaded from the run's ``adapter`` folder by
        :meth:`check`.
    """

    name: str = "predict-labels"
    settings: ClassifyConfig = field(default_factory=ClassifyConfig)
    classifier: Classifier | None = field(default=None, repr=False)

    def check(self, config: RunConfig) -> None:
        """Load the classifier of ``adapter`` (unless given) and check that it belongs to the checkpoint.

        Raises
        ------
        ValueError
            Without a classifier, or for a model that is not the checkpoint's transformer.
        UserError
            When the classifier's files do not belong together or to the checkpoint
            (:func:`~transcriptformer.model.classifier.load_classifier`).
        """
        if config.model.model_type != "transcriptformer":
            raise ValueError(
                f"the classifier reads the cell embeddings of the checkpoint's model, not those of model_type "
                f"{config.model.model_type}: leave model_type at transcriptformer"
            )
        adapter = config.model.adapter
        if self.classifier is None and adapter is None:
            raise ValueError(
                "labelling cells needs a classifier: set adapter to a folder written by "
                "'transcriptformer finetune --task classify'"
            )
        from transcriptformer.checkpoint import WEIGHTS_FILE
        from transcriptformer.model.classifier import CLASSIFIER_WEIGHTS_FILE, load_classifier
        from transcriptformer.safe_load import sha256_of

        head_sha256 = ""
        if self.classifier is None:
            self.classifier = load_classifier(adapter, Path(config.model.checkpoint_path) / WEIGHTS_FILE)
            head_sha256 = sha256_of(Path(adapter) / CLASSIFIER_WEIGHTS_FILE)
        info = self.classifier.info
        self.settings = ClassifyConfig(info.label_key, list(info.classes), head_sha256)

    @property
    def predicted_column(self) -> str:
        """``predicted_<key>``: each cell's most probable class."""
        return f"predicted_{self.settings.label_key}"

    @property
    def probability_column(self) -> str:
        """``predicted_<key>_probability``: the probability of the predicted class."""
        return f"{self.predicted_column}_probability"

    @property
    def probabilities_key(self) -> str:
        """``<key>_probabilities``: the obsm key of every class's probability, and the uns key of the classes."""
        return f"{self.settings.label_key}_probabilities"

    def output_keys(self, config: RunConfig) -> tuple[str, ...]:
        """The run's ``output_keys`` and the cell embeddings the head reads."""
        return tuple(dict.fromkeys([*config.predict.output_keys, EMBEDDINGS]))

    def added_obs_columns(self) -> tuple[str, ...]:
        """The predicted class and its probability."""
        return self.predicted_column, self.probability_column

    def run_unit(
        self,
        session: Session,
        unit: WorkUnit,
        cells: TokenizedCells,
        on_batch: Callable[[int], object],
        limit: MemoryLimit,
    ) -> Part:
        """The batch loop's outputs of the unit's cells, with the classes the head predicts from their embeddings."""
        part = super().run_unit(session, unit, cells, on_batch, limit)
        values = part.outputs.cell_values
        values.update(self.predictions(values[EMBEDDINGS]))
        if EMBEDDINGS not in session.config.predict.output_keys:
            del values[EMBEDDINGS]
        return part

    def predictions(self, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """The per-cell values of ``(n_cells, E)`` cell embeddings.

        Every class's probability, the predicted class (its index, ``-1`` where unknown) and its probability (NaN
        where unknown).
        """
        probabilities = self.classifier.probabilities(embeddings).astype(np.float32)
        known = np.isfinite(probabilities).all(axis=1)
        best = np.where(known, np.nan_to_num(probabilities, nan=-1.0).argmax(axis=1), -1)
        return {
            self.probabilities_key: probabilities,
            self.predicted_column: best.astype(np.int64),
            self.probability_column: probabilities.max(axis=1),  # NaN where unknown
        }

    def finish(self, obs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
        """The predicted classes as categories; the classes and their counts as uns ``<key>_probabilities``."""
        classes = self.settings.classes
        predicted = pd.Categorical.from_codes(obs[self.predicted_column].to_numpy(dtype=np.int64), categories=classes)
        obs = obs.assign(**{self.predicted_column: predicted})
        counts = pd.Series(predicted).value_counts().reindex(classes).to_numpy(dtype=np.int64)
        return obs, {self.probabilities_key: {"classes": np.asarray(classes, dtype=object), "counts": counts}}

    def describe(self, uns: dict) -> list[str]:
        """One line: the cells of each predicted class."""
        entry = uns[self.probabilities_key]
        counted = [f"{name} {count}" for name, count in zip(entry["classes"], entry["counts"], strict=True) if count]
        return ["Predicted: " + (", ".join(counted) or "no class (no cell has counts of the vocabulary's genes)")]

    def write_into(self, adata: ad.AnnData, result: MemoryResult) -> None:
        """The predicted classes and their probabilities into obs, every class's into obsm, the classes into uns."""
        super().write_into(adata, result)
        adata.obs[self.predicted_column] = result.obs[self.predicted_column].array  # categorical, as in the file
        adata.obsm[self.probabilities_key] = result.outputs.cell_values[self.probabilities_key]
