"""Python API: load a checkpoint, run it on cells, get NumPy arrays back.

>>> import transcriptformer
>>> model = transcriptformer.load("checkpoints/tf_sapiens", device="cpu")
>>> result = model.predict("cells.h5ad", batch_size=8)
>>> result["embeddings"].shape
(n_cells, 2048)
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from transcriptformer.checkpoint import Checkpoint, load_checkpoint
from transcriptformer.data.batching import PlannedBatch, plan_batches
from transcriptformer.data.tokenize import CellTokenizer, TokenizedCells, TokenizerSettings
from transcriptformer.model.attention import Backend, preferred_length_multiple

DEFAULT_OUTPUT_KEYS = ("embeddings", "llh", "gene_llh", "mu")
PER_POSITION_KEYS = ("gene_llh", "mu", "cge", "gene_token_indices", "gene_counts")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else MPS, else CPU; otherwise ``device`` itself."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but this torch build sees no CUDA GPU")
    return device


class TranscriptFormerModel:
    """A loaded checkpoint ready for inference.

    Parameters
    ----------
    checkpoint : Checkpoint
        From :func:`~transcriptformer.checkpoint.load_checkpoint`.
    device : torch.device
        Where the model runs.
    """

    def __init__(self, checkpoint: Checkpoint, device: torch.device):
        self.checkpoint = checkpoint
        self.device = device

    @property
    def model(self) -> torch.nn.Module:
        """The underlying :class:`~transcriptformer.model.transcriptformer.TranscriptFormer`."""
        return self.checkpoint.model

    def tokenize(
        self,
        data: ad.AnnData | str | Path,
        *,
        gene_col_name: str | None = None,
        use_raw: bool | None = None,
        clip_counts: float | None = 30.0,
        filter_to_vocab: bool = True,
        remove_duplicate_genes: bool = False,
    ) -> TokenizedCells:
        """Turn an AnnData (or ``.h5ad`` path) into model inputs, all cells at once.

        ``gene_col_name`` defaults to the checkpoint's; ``clip_counts`` to the original inference's 30.
        """
        tokenizer = self.cell_tokenizer(
            gene_col_name=gene_col_name,
            clip_counts=clip_counts,
            filter_to_vocab=filter_to_vocab,
            remove_duplicate_genes=remove_duplicate_genes,
        )
        return tokenizer.tokenize(data, use_raw)

    def cell_tokenizer(
        self,
        *,
        gene_col_name: str | None = None,
        clip_counts: float | None = 30.0,
        filter_to_vocab: bool = True,
        remove_duplicate_genes: bool = False,
    ) -> CellTokenizer:
        """The checkpoint's tokenizer, to read cells in row blocks (arguments as in :meth:`tokenize`)."""
        data_config = self.checkpoint.config.data_config
        settings = TokenizerSettings(
            seq_len=self.checkpoint.config.model_config.seq_len,
            pad_zeros=data_config.pad_zeros,
            sort_genes=data_config.sort_genes,
            normalize_to_scale=data_config.normalize_to_scale,
            clip_counts=clip_counts,
        )
        return CellTokenizer(
            self.checkpoint.gene_vocab,
            self.checkpoint.aux_vocabs,
            settings,
            gene_col_name=gene_col_name or data_config.gene_col_name,
            filter_to_vocab=filter_to_vocab,
            remove_duplicate_genes=remove_duplicate_genes,
            pad_token=data_config.gene_pad_token,
            aux_unknown_token=data_config.aux_pad_token,
        )

    def predict(
        self,
        data: ad.AnnData | str | Path | TokenizedCells,
        *,
        batch_size: int = 8,
        max_tokens: int | None = None,
        output_keys: Collection[str] = DEFAULT_OUTPUT_KEYS,
        **tokenize_kwargs,
    ) -> dict[str, np.ndarray]:
        """Embeddings and likelihoods of every cell, in input order.

        Parameters
        ----------
        data
            AnnData, file path, or cells already tokenized with :meth:`tokenize`.
        batch_size
            Cells per forward pass; results do not depend on it.
        max_tokens
            Token budget per forward pass instead of a fixed ``batch_size``.
        output_keys
            Any of ``embeddings``, ``llh``, ``gene_llh``, ``mu`` and ``cge`` (see
            :meth:`TranscriptFormer.predict`).
        **tokenize_kwargs
            Passed to :meth:`tokenize`.

        Returns
        -------
        dict of str to ndarray
            The requested outputs, plus ``gene_token_indices`` and ``gene_counts`` ``(n_cells, seq_len)``
            (the model inputs, which say which gene each per-position output belongs to) and
            ``aux_token_indices``. Per-position outputs are 0 at padding.
        """
        cells = data if isinstance(data, TokenizedCells) else self.tokenize(data, **tokenize_kwargs)
        results: dict[str, np.ndarray] = {}
        for rows, outputs in self.iter_batches(
            cells, batch_size=batch_size, max_tokens=max_tokens, output_keys=output_keys
        ):
            for key, value in outputs.items():
                if key not in PER_POSITION_KEYS:
                    results.setdefault(key, np.zeros((len(cells), *value.shape[1:]), value.dtype))[rows] = value
                    continue
                shape = (len(cells), cells.settings.seq_len, *value.shape[2:])
                padding = cells.pad_token if key == "gene_token_indices" else 0
                results.setdefault(key, np.full(shape, padding, value.dtype))[rows, : value.shape[1]] = value
        return results

    def iter_batches(
        self,
        cells: TokenizedCells,
        *,
        batch_size: int = 8,
        max_tokens: int | None = None,
        output_keys: Collection[str] = DEFAULT_OUTPUT_KEYS,
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Run the model over length-aware batches of ``cells``.

        Yields
        ------
        rows, outputs
            The cells (indices into ``cells``) of one forward pass and their outputs; per-position outputs
            are trimmed to the batch's length (see :mod:`transcriptformer.data.batching`).
        """
        for planned in self.batch_plan(cells, batch_size=batch_size, max_tokens=max_tokens):
            batch = cells.batch(planned.rows, planned.length)
            on_device = batch.to(self.device)
            outputs = self.model.predict(
                on_device.gene_tokens, on_device.gene_counts, on_device.aux_tokens, output_keys=output_keys
            )
            arrays = {key: value.cpu().numpy() for key, value in outputs.items()}
            arrays["gene_token_indices"] = batch.gene_tokens.numpy()
            arrays["gene_counts"] = batch.gene_counts.numpy()
            arrays["aux_token_indices"] = batch.aux_tokens.numpy()
            yield planned.rows, arrays

    def batch_plan(
        self, cells: TokenizedCells, *, batch_size: int = 8, max_tokens: int | None = None
    ) -> list[PlannedBatch]:
        """The length-aware batches :meth:`iter_batches` runs ``cells`` in (see :func:`plan_batches`)."""
        multiple = preferred_length_multiple(self.model.attention_backend, self.device)
        return plan_batches(
            cells.n_tokens(), cells.settings.seq_len, batch_size=batch_size, max_tokens=max_tokens, multiple=multiple
        )

    def embed(self, data: ad.AnnData | str | Path, *, batch_size: int = 8, **tokenize_kwargs) -> np.ndarray:
        """Cell embeddings ``(n_cells, E)``."""
        return self.predict(data, batch_size=batch_size, output_keys=("embeddings",), **tokenize_kwargs)["embeddings"]


def load(
    path: str | Path,
    device: str | torch.device | None = "auto",
    attention_backend: Backend = "auto",
    adapter: str | Path | None = None,
) -> TranscriptFormerModel:
    """Load a checkpoint directory for inference.

    Parameters
    ----------
    path
        Checkpoint directory in the published layout.
    device
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    attention_backend
        ``"auto"``, ``"flex"``, ``"chunked"`` or ``"dense"``.
    adapter
        LoRA adapters (from ``transcriptformer finetune``) to merge into the weights.
    """
    device = resolve_device(device)
    return TranscriptFormerModel(load_checkpoint(path, device, attention_backend, adapter=adapter), device)
