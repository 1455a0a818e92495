"""A new, untrained TranscriptFormer for pretraining: vocabularies, frozen gene table and seeded weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from transcriptformer.checkpoint import Checkpoint, special_tokens_of
from transcriptformer.config import TranscriptFormerConfig
from transcriptformer.data.vocab import GeneVocab, build_gene_vocab, read_embedding_table
from transcriptformer.model.transcriptformer import TranscriptFormer
from transcriptformer.training.config import TrainConfig


def build_gene_table(vocab: GeneVocab, embedding_files: Sequence[str | Path], seed: int) -> torch.Tensor:
    """The frozen ``(V, width)`` table: uniform [0, 1) rows for the special tokens, then the files' vectors.

    Parameters
    ----------
    vocab
        Built from the same files (:func:`build_gene_vocab`); a gene in several files keeps its first vector.
    embedding_files
        Gene-embedding ``.h5`` files.
    seed
        Seed of the special-token rows.
    """
    tables = []
    seen: set[str] = set()
    for path in embedding_files:
        ids, table = read_embedding_table(path)
        first = np.array([gene not in seen for gene in ids], dtype=bool)
        seen.update(ids)
        tables.append(table[first])
    genes = np.concatenate(tables)
    generator = torch.Generator().manual_seed(seed)
    special = torch.rand(len(vocab.special_tokens), genes.shape[1], generator=generator)
    table = torch.cat([special, torch.from_numpy(genes)])
    if table.shape[0] != len(vocab):
        raise ValueError(f"gene table has {table.shape[0]} rows but the vocabulary {len(vocab)} entries")
    return table


def aux_vocabs_from_obs(
    adatas: Sequence[ad.AnnData], aux_cols: Sequence[str], unknown_token: str = "unknown"
) -> dict[str, dict[str, int]]:
    """Vocabulary of each aux column: ``unknown_token`` first, then the values seen in ``obs``, sorted.

    Raises
    ------
    KeyError
        When a column is missing from the ``obs`` of a file.
    """
    vocabs = {}
    for col in aux_cols:
        values: set[str] = set()
        for adata in adatas:
            if col not in adata.obs.columns:
                raise KeyError(f"aux column {col!r} is not in obs (columns: {list(adata.obs.columns)})")
            column = adata.obs[col]
            values.update(str(v) for v in pd.unique(column[column.notna()]))
        values.discard(unknown_token)
        vocabs[col] = {unknown_token: 0, **{value: i + 1 for i, value in enumerate(sorted(values))}}
    return vocabs


def new_checkpoint(cfg: TrainConfig, adatas: Sequence[ad.AnnData]) -> Checkpoint:
    """An untrained model, its vocabularies and config, deterministic given ``cfg.trainer.seed``.

    Parameters
    ----------
    cfg
        ``data_config.esm2_mappings`` lists the gene-embedding files, ``data_config.aux_cols`` the aux columns.
    adatas
        Training cells, whose ``obs`` give the aux vocabularies.
    """
    data_config = cfg.data_config
    if not data_config.esm2_mappings:
        raise ValueError("data_config.esm2_mappings must list at least one gene-embedding .h5 file")
    missing = [f for f in data_config.esm2_mappings if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"gene-embedding file(s) not found: {missing}")
    seed = cfg.trainer.seed
    gene_vocab = build_gene_vocab(data_config.special_tokens, data_config.esm2_mappings)
    aux_vocabs = aux_vocabs_from_obs(adatas, data_config.aux_cols, data_config.aux_pad_token)
    table = build_gene_table(gene_vocab, data_config.esm2_mappings, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TranscriptFormer(
            cfg.model_config,
            cfg.loss_config,
            gene_table=table,
            special_tokens=special_tokens_of(gene_vocab, data_config.gene_pad_token),
            aux_vocabs=aux_vocabs,
            aux_pad_token=data_config.aux_pad_token,
            attention_backend=cfg.trainer.attention_backend,
        )
    config = TranscriptFormerConfig(data_config, cfg.model_config, cfg.loss_config)
    return Checkpoint(
        path=Path(cfg.output_path), config=config, gene_vocab=gene_vocab, aux_vocabs=aux_vocabs, model=model
    )
