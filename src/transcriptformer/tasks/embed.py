"""``inference``: cell embeddings and the other outputs of the batch loop, one row per cell.

From files (``transcriptformer inference``) the outputs go to the ``.h5ad`` as each output's AnnData slot says
(:data:`~transcriptformer.model.outputs.OUTPUTS`); in memory
(:meth:`TranscriptFormerModel.embed <transcriptformer.api.TranscriptFormerModel.embed>`) the cell embeddings go to
``adata.obsm[key_added]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from transcriptformer.engine.config import EMBEDDING_KEY
from transcriptformer.engine.task import BatchLoopTask

if TYPE_CHECKING:
    import anndata as ad

    from transcriptformer.engine.run import MemoryResult

EMBEDDINGS = "embeddings"  # the model output this task stores in obsm


@dataclass
class EmbedConfig:
    """The settings of the embed task.

    Attributes
    ----------
    key_added : str or None
        ``obsm`` key of the cell embeddings written into an in-memory AnnData (scanpy's ``X_<basis>``, as
        scvi-tools' ``X_scVI``); ``None`` leaves the AnnData unchanged.
    """

    key_added: str | None = EMBEDDING_KEY


@dataclass
class EmbedTask(BatchLoopTask):
    """The batch loop's outputs of the run's ``output_keys`` for every cell."""

    name: str = "inference"
    settings: EmbedConfig = field(default_factory=EmbedConfig)

    def write_into(self, adata: ad.AnnData, result: MemoryResult) -> None:
        """The per-cell numbers into obs, the cell embeddings into ``obsm[key_added]``."""
        super().write_into(adata, result)
        key = self.settings.key_added
        if key is not None and EMBEDDINGS in result.outputs.cell_values:
            adata.obsm[key] = result.outputs.cell_values[EMBEDDINGS]
