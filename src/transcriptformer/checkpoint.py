"""Load and save checkpoint directories in the published layout (SPEC section 2).

::

    <ckpt>/config.json
    <ckpt>/model_weights.pt             plain state_dict, loaded with weights_only=True
    <ckpt>/vocabs/<col>_vocab.json      one per aux column
    <ckpt>/vocabs/<species>_gene.h5     gene-embedding tables named in data_config.esm2_mappings
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transcriptformer.config import CONFIG_FILE, VOCAB_DIR, WEIGHTS_FILE, TranscriptFormerConfig
from transcriptformer.data.tokenize import CellTokenizer
from transcriptformer.data.vocab import GeneVocab, build_gene_vocab, load_aux_vocab
from transcriptformer.errors import UserError
from transcriptformer.model.esm2ce import ESM2CellEmbedding
from transcriptformer.model.gene_swap import swap_gene_embeddings
from transcriptformer.model.lora import load_adapters
from transcriptformer.model.transcriptformer import SpecialTokens, TranscriptFormer
from transcriptformer.runtime import Backend
from transcriptformer.safe_load import load_torch_file

WEIGHTS_FIX = "download the checkpoint again ('transcriptformer download'), or use one that this tool saved"


@dataclass
class Checkpoint:
    """A loaded checkpoint: its config, vocabularies and model (in eval mode).

    Attributes
    ----------
    path : Path
        The checkpoint directory.
    config : TranscriptFormerConfig
    gene_vocab : GeneVocab
    aux_vocabs : dict
        Column -> value -> index.
    model : TranscriptFormer
    """

    path: Path
    config: TranscriptFormerConfig
    gene_vocab: GeneVocab
    aux_vocabs: dict[str, dict[str, int]]
    model: TranscriptFormer

    def tokenizer(self, *, remove_duplicate_genes: bool = False, **data_config: Any) -> CellTokenizer:
        """The tokenizer of this checkpoint: its vocabularies and its ``data_config``.

        Parameters
        ----------
        remove_duplicate_genes
            Keep the first of duplicated gene ids instead of raising.
        **data_config
            Fields of :class:`~transcriptformer.config.DataConfig` that replace the checkpoint's for this
            tokenizer, e.g. ``gene_col_name="index"`` or ``clip_counts=None``.
        """
        known = {f.name for f in dataclasses.fields(self.config.data_config)}
        unknown = sorted(set(data_config) - known)
        if unknown:
            raise ValueError(f"unknown data_config setting(s) {unknown}; choose from {sorted(known)}")
        return CellTokenizer(
            self.gene_vocab,
            self.aux_vocabs,
            dataclasses.replace(self.config.data_config, **data_config),
            self.config.model_config.seq_len,
            remove_duplicate_genes=remove_duplicate_genes,
        )

    def with_gene_embeddings(self, embedding_files: Sequence[str | Path]) -> Checkpoint:
        """The checkpoint running on the genes of other gene-embedding files (its model is changed in place).

        See :mod:`transcriptformer.model.gene_swap`; the returned checkpoint's vocabulary is the new one.
        """
        return dataclasses.replace(self, gene_vocab=swap_gene_embeddings(self.model, self.gene_vocab, embedding_files))

    def esm2ce(self) -> ESM2CellEmbedding:
        """The ``esm2ce`` baseline over this checkpoint's frozen gene-embedding table."""
        model = self.model
        return ESM2CellEmbedding(model.gene_embeddings.embedding, model.special_tokens, model.seq_len)


def read_vocabularies(path: Path, config: TranscriptFormerConfig) -> tuple[GeneVocab, dict[str, dict[str, int]]]:
    """Build the gene vocabulary and read the aux vocabularies of a checkpoint directory."""
    data = config.data_config
    vocab_dir = path / VOCAB_DIR
    if not data.esm2_mappings:
        raise ValueError(f"{path / CONFIG_FILE}: data_config.esm2_mappings lists no gene-embedding file")
    gene_files = [vocab_dir / name for name in data.esm2_mappings]
    aux_files = {col: vocab_dir / f"{col}_vocab.json" for col in data.aux_cols}
    missing = [str(p) for p in [*gene_files, *aux_files.values()] if not p.exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is missing vocabulary files: {missing}")
    gene_vocab = build_gene_vocab(data.special_tokens, gene_files)
    aux_vocabs = {col: load_aux_vocab(f, data.aux_pad_token) for col, f in aux_files.items()}
    return gene_vocab, aux_vocabs


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain state_dict safely (:func:`~transcriptformer.safe_load.load_torch_file`: tensors only)."""
    state = load_torch_file(path, what="model weights", fix=WEIGHTS_FIX)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a plain state_dict of tensors: {WEIGHTS_FIX}")
    return state


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    attention_backend: Backend = "auto",
    config: TranscriptFormerConfig | None = None,
    adapter: str | Path | None = None,
) -> Checkpoint:
    """Load a checkpoint directory; the weights must match the architecture exactly (strict).

    Parameters
    ----------
    path
        Directory with ``config.json``, ``model_weights.pt`` and ``vocabs/``.
    device
        Where to put the model.
    attention_backend
        See :class:`~transcriptformer.model.transcriptformer.TranscriptFormer`.
    config
        Use this configuration instead of the directory's ``config.json`` (for example one with overridden
        fields); the weights must still match it.
    adapter
        A LoRA adapter directory (from ``transcriptformer finetune``) to merge into the weights.
    """
    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not a TranscriptFormer checkpoint: {name} is missing")
    config = config or TranscriptFormerConfig.from_json(path / CONFIG_FILE)
    gene_vocab, aux_vocabs = read_vocabularies(path, config)
    state = load_state_dict(path / WEIGHTS_FILE)

    table = state["gene_embeddings.embedding.weight"]
    if table.shape[0] != len(gene_vocab):
        raise ValueError(
            f"{path}: the gene embedding in {WEIGHTS_FILE} has {table.shape[0]} rows but the vocabulary built "
            f"from {config.data_config.esm2_mappings} and the special tokens has {len(gene_vocab)} entries"
        )
    model = TranscriptFormer(
        config.model_config,
        config.loss_config,
        gene_table=torch.zeros_like(table),
        special_tokens=special_tokens_of(gene_vocab, config.data_config.gene_pad_token),
        aux_vocabs=aux_vocabs,
        aux_pad_token=config.data_config.aux_pad_token,
        attention_backend=attention_backend,
    )
    model.load_state_dict(state, strict=True)
    if adapter is not None:
        model = load_adapters(model, adapter)
    model.to(device).eval()
    return Checkpoint(path=path, config=config, gene_vocab=gene_vocab, aux_vocabs=aux_vocabs, model=model)


def special_tokens_of(vocab: GeneVocab, gene_pad_token: str = "[PAD]") -> SpecialTokens:
    """The padding, ``[START]`` and ``[END]`` indices of a vocabulary."""
    return SpecialTokens(pad=vocab.special(gene_pad_token), start=vocab.special("[START]"), end=vocab.special("[END]"))


def save_checkpoint(
    path: str | Path,
    config: TranscriptFormerConfig,
    model: torch.nn.Module,
    aux_vocabs: dict[str, dict[str, int]],
    gene_embedding_files: list[str | Path],
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint directory in the published layout, which :func:`load_checkpoint` reads back.

    Parameters
    ----------
    path
        Directory to create (or fill).
    config
        The checkpoint's config; its ``esm2_mappings`` are set to the names of ``gene_embedding_files``.
    model
        A :class:`TranscriptFormer`; its state_dict is saved as plain CPU tensors.
    aux_vocabs
        Vocabulary of each aux column, written as ``vocabs/<col>_vocab.json``.
    gene_embedding_files
        Gene-embedding ``.h5`` files, in vocabulary order, copied into ``vocabs/``.
    overwrite
        Replace the config and weights of an existing checkpoint at ``path``.

    Raises
    ------
    FileExistsError
        When ``path`` already holds a checkpoint and ``overwrite`` is False.
    """
    path = Path(path)
    if not overwrite and any((path / name).exists() for name in (CONFIG_FILE, WEIGHTS_FILE)):
        raise FileExistsError(
            f"{path} already holds a checkpoint; choose another directory, or pass --overwrite to replace it"
        )
    names = [Path(f).name for f in gene_embedding_files]
    if len(set(names)) != len(names):
        raise ValueError(f"gene-embedding files must have distinct names, got {names}")
    vocab_dir = path / VOCAB_DIR
    vocab_dir.mkdir(parents=True, exist_ok=True)
    for source in map(Path, gene_embedding_files):
        if source.resolve() != (vocab_dir / source.name).resolve():
            shutil.copyfile(source, vocab_dir / source.name)
    for col, vocab in aux_vocabs.items():
        (vocab_dir / f"{col}_vocab.json").write_text(json.dumps(vocab, indent=2) + "\n")
    data_config = dataclasses.replace(config.data_config, esm2_mappings=names, aux_cols=list(aux_vocabs))
    saved = dataclasses.replace(config, data_config=data_config)
    (path / CONFIG_FILE).write_text(json.dumps(saved.to_dict(), indent=2) + "\n")
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    torch.save(state, path / WEIGHTS_FILE)
    return path
