"""Load and save checkpoint directories in the published layout (SPEC section 2).

::

    <ckpt>/config.json
    <ckpt>/model_weights.pt             plain state_dict, loaded with weights_only=True
    <ckpt>/vocabs/<col>_vocab.json      one per aux column
    <ckpt>/vocabs/<species>_gene.h5     gene-embedding tables named in data_config.esm2_mappings

Loading checks that the parts belong together and hold numbers: every weight is finite, the config describes the
weights' shapes, the gene rows of the weights' embedding table are the vectors of ``vocabs/*.h5`` in vocabulary
order, and the settings that the shapes do not show (``seq_len``, ``num_heads``, ...) are those the weights were
saved with, when the weights file records them (:func:`save_checkpoint` does).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from transcriptformer.config import CONFIG_FILE, VOCAB_DIR, WEIGHTS_FILE, ModelConfig, TranscriptFormerConfig
from transcriptformer.data.gene_symbols import symbols_by_id
from transcriptformer.data.tokenize import CellTokenizer
from transcriptformer.data.vocab import (
    GeneVocab,
    build_gene_vocab,
    load_aux_vocab,
    read_embedding_keys,
    read_embedding_table,
)
from transcriptformer.errors import UserError
from transcriptformer.model.esm2ce import ESM2CellEmbedding
from transcriptformer.model.gene_swap import swap_gene_embeddings
from transcriptformer.model.lora import load_adapters
from transcriptformer.model.transcriptformer import SpecialTokens, TranscriptFormer
from transcriptformer.runtime import Backend
from transcriptformer.safe_load import load_torch_file

WEIGHTS_FIX = "download the checkpoint again ('transcriptformer download'), or use one that this tool saved"
TABLE_KEY = "gene_embeddings.embedding.weight"
# Settings of model_config that the shapes of the weights do not show. save_checkpoint records them in the weights
# file (torch's state-dict metadata, which load_state_dict ignores); loading refuses a config that disagrees.
RECORDED_SETTINGS = ("seq_len", "num_heads", "softcap", "log_counts_eps", "activation")
RECORD_KEY = "transcriptformer_model_config"
# Gene rows of the embedding table compared with the vocabulary files at load, spread over the table.
CHECKED_TABLE_ROWS = 64


class CheckpointMismatchError(UserError, ValueError):
    """The parts of a checkpoint directory do not belong together, or its weights are not finite."""


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


GENE_FILE_SUFFIX = "_gene.h5"


def vocabulary_genes(path: str | Path, search: str | None = None) -> pd.DataFrame:
    """The genes of a checkpoint's vocabulary, in vocabulary order.

    Parameters
    ----------
    path
        The checkpoint directory.
    search
        Keep the genes whose id or symbol contains this text, ignoring case.

    Returns
    -------
    pandas.DataFrame
        ``gene_id``, ``symbol`` (from the bundled human and mouse tables; empty when they lack the gene) and
        ``species`` (the gene-embedding file it comes from: ``mus_musculus`` for ``mus_musculus_gene.h5``).
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a TranscriptFormer checkpoint: {CONFIG_FILE} is missing")
    config = TranscriptFormerConfig.from_json(path / CONFIG_FILE)
    vocab, _ = read_vocabularies(path, config)
    species = {}
    for name in config.data_config.esm2_mappings:
        for gene in read_embedding_keys(path / VOCAB_DIR / name):
            species.setdefault(gene, name.removesuffix(GENE_FILE_SUFFIX))
    symbols = symbols_by_id()
    genes = vocab.gene_ids
    table = pd.DataFrame(
        {"gene_id": genes, "symbol": [symbols.get(g, "") for g in genes], "species": [species[g] for g in genes]}
    )
    if search:
        text = search.lower()
        table = table[
            table["gene_id"].str.lower().str.contains(text, regex=False)
            | table["symbol"].str.lower().str.contains(text, regex=False)
        ]
    return table.reset_index(drop=True)


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
    check_finite_weights(state, path / WEIGHTS_FILE, gene_vocab)
    check_recorded_settings(state, config.model_config, path)
    if TABLE_KEY not in state:
        raise CheckpointMismatchError(f"{path / WEIGHTS_FILE} holds no gene-embedding table ({TABLE_KEY})")
    table = state[TABLE_KEY]
    if table.shape[0] != len(gene_vocab):
        raise CheckpointMismatchError(
            f"{path}: the gene embedding in {WEIGHTS_FILE} has {table.shape[0]} rows but the vocabulary built "
            f"from {config.data_config.esm2_mappings} and the special tokens has {len(gene_vocab)} entries"
        )
    check_gene_table(table, gene_vocab, [path / VOCAB_DIR / name for name in config.data_config.esm2_mappings])
    model = TranscriptFormer(
        config.model_config,
        config.loss_config,
        gene_table=table,
        special_tokens=special_tokens_of(gene_vocab, config.data_config.gene_pad_token),
        aux_vocabs=aux_vocabs,
        aux_pad_token=config.data_config.aux_pad_token,
        attention_backend=attention_backend,
    )
    expected = model.state_dict()
    check_shapes(expected, state, path)
    # The file's tensors become the weights (no copy), in the dtype the architecture declares (as a copy would be).
    # A model built on the meta device would skip the random initialisation too, but its initialisers import
    # torch's compiler, which costs more than they do.
    model.load_state_dict({key: state[key].to(expected[key].dtype) for key in expected}, strict=True, assign=True)
    if adapter is not None:
        model = load_adapters(model, adapter, base_weights=path / WEIGHTS_FILE)
    model.to(device).eval()
    return Checkpoint(path=path, config=config, gene_vocab=gene_vocab, aux_vocabs=aux_vocabs, model=model)


def check_finite_weights(state: Mapping[str, torch.Tensor], weights_file: Path, vocab: GeneVocab) -> None:
    """Refuse weights that hold NaN or infinite values, naming the first tensor (and genes of the embedding table)."""
    bad = [key for key, value in state.items() if value.is_floating_point() and not all_finite(value)]
    if not bad:
        return
    detail = ""
    if bad[0] == TABLE_KEY:
        rows = np.flatnonzero(~torch.isfinite(state[TABLE_KEY]).all(dim=1).numpy())
        tokens = list(vocab.index)
        detail = f", the rows of {[tokens[r] for r in rows[:3] if r < len(tokens)]} among {rows.size}"
    raise CheckpointMismatchError(
        f"{weights_file}: {len(bad)} weight tensor(s) hold NaN or infinite values (first: {bad[0]}{detail}); the "
        "file is damaged or comes from a diverged run: download or train the checkpoint again"
    )


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a CPU tensor holds no NaN or infinite value.

    A NaN or infinite value makes the sum NaN or infinite: a finite sum settles it in one pass without a temporary
    (20 times faster than a mask of the values on the weights of a checkpoint); the values themselves are checked
    only when the sum is not finite (a damaged tensor, or finite values whose sum overflows).
    """
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_recorded_settings(state: Mapping[str, torch.Tensor], model_config: ModelConfig, path: Path) -> None:
    """Refuse a config whose ``seq_len``, ``num_heads``, ... differ from those recorded with the weights."""
    metadata = getattr(state, "_metadata", None) or {}
    recorded = metadata.get("", {}).get(RECORD_KEY, {})
    differ = [
        f"model_config.{name} is {getattr(model_config, name)!r} but the weights were saved with {value!r}"
        for name, value in recorded.items()
        if name in RECORDED_SETTINGS and getattr(model_config, name) != value
    ]
    if differ:
        raise CheckpointMismatchError(
            f"{path}: the config does not match {WEIGHTS_FILE}: {'; '.join(differ)}; restore these settings in "
            f"{CONFIG_FILE} (and drop any config_override of them)"
        )


def check_shapes(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse weights whose tensors are not those of the architecture the config describes, saying what differs."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [key for key in expected if key in state and expected[key].shape != state[key].shape]
    if not (missing or unexpected or reshaped):
        return
    parts = []
    if reshaped:
        key = reshaped[0]
        parts.append(
            f"{len(reshaped)} tensor(s) of another shape (first: {key} is {tuple(state[key].shape)} in the weights, "
            f"{tuple(expected[key].shape)} by the config)"
        )
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    raise CheckpointMismatchError(
        f"{path / WEIGHTS_FILE} does not hold the weights that {CONFIG_FILE} describes: {'; '.join(parts)}; "
        "model_config (num_layers, embed_dim, model_dim, gene_head_hidden_dim, attn_bias, fw_bias), aux_cols and "
        "loss_config.gene_id_loss_weight must be those the weights were trained with"
    )


def check_gene_table(table: torch.Tensor, vocab: GeneVocab, gene_files: Sequence[Path]) -> None:
    """Refuse a table whose gene rows are not the vectors of ``gene_files`` for the genes of the vocabulary.

    Up to :data:`CHECKED_TABLE_ROWS` gene rows spread over the table are compared. A row matches when the file's
    vector of its gene is the nearest, among the vectors compared, to the row: exact copies match, and so do rows
    that training moved a little, while reordered keys or the vectors of another table do not.
    """
    genes = vocab.gene_ids
    if not genes:
        return
    picked = np.unique(np.linspace(0, len(genes) - 1, min(CHECKED_TABLE_ROWS, len(genes))).round().astype(int))
    ids = [genes[i] for i in picked]
    expected = vectors_of(ids, gene_files)
    if expected.shape[1] != table.shape[1]:
        raise CheckpointMismatchError(
            f"the gene vectors of {[str(f) for f in gene_files]} are {expected.shape[1]} wide but the weights' "
            f"embedding table is {table.shape[1]} wide: the vocabulary files belong to another checkpoint"
        )
    actual = table[[vocab[g] for g in ids]].double().numpy()
    expected = expected.astype(np.float64)
    distances = (actual**2).sum(1)[:, None] + (expected**2).sum(1)[None, :] - 2 * actual @ expected.T
    own = np.diag(distances).copy()
    np.fill_diagonal(distances, np.inf)
    wrong = ~(own <= distances.min(axis=1)) if len(ids) > 1 else ~np.isfinite(own)
    if wrong.any():
        first = ids[int(np.flatnonzero(wrong)[0])]
        raise CheckpointMismatchError(
            f"the gene rows of the weights' embedding table do not match the vectors of {[str(f) for f in gene_files]}"
            f": {int(wrong.sum())} of the {len(ids)} genes compared differ (first: {first}); the vocabulary files "
            "were reordered or replaced: restore the checkpoint's own vocabs/ files"
        )


def vectors_of(gene_ids: Sequence[str], gene_files: Sequence[Path]) -> np.ndarray:
    """``(len(gene_ids), width)`` vectors of genes, each read from the first of ``gene_files`` that holds it."""
    vectors: dict[str, np.ndarray] = {}
    for gene_file in gene_files:
        keys = set(read_embedding_keys(gene_file))
        here = [g for g in gene_ids if g in keys and g not in vectors]
        if here:
            vectors.update(zip(here, read_embedding_table(gene_file, here)[1], strict=True))
    return np.stack([vectors[g] for g in gene_ids])


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
            f"{path} already holds a checkpoint; choose another directory, or pass `overwrite=True` to replace it"
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
    model_state = model.state_dict()
    state = OrderedDict((key, value.detach().cpu().contiguous()) for key, value in model_state.items())
    state._metadata = getattr(model_state, "_metadata", OrderedDict())
    state._metadata.setdefault("", {})[RECORD_KEY] = {
        name: getattr(config.model_config, name) for name in RECORDED_SETTINGS
    }
    torch.save(state, path / WEIGHTS_FILE)
    return path
