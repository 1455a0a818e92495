"""Out-of-distribution species: run a model with another species' gene-embedding table (SPEC section 7).

A swap replaces the frozen protein-embedding table. The special tokens keep their indices and their rows; the
genes of the new table file(s) follow, in file order and key order (a gene listed twice keeps its first row).

Two parts of the model were trained over the old vocabulary and are re-indexed by gene id, never by position:

* **Count head, per-gene bias** (``mu.gene_embedding``). A gene present in both vocabularies keeps its trained
  bias. A gene the model never saw gets the mean bias of the old vocabulary's genes: the count head's softmax
  over a cell's genes then treats it like a typical gene and relies on its embedding and its context alone.
* **Gene-id head** (``gene_llh``), a classifier over the old vocabulary, is left as it is. A target it has a class
  for (special tokens such as ``[END]``, genes in both vocabularies) is scored exactly as before. A new gene has no
  class, so its ``gene_llh`` is NaN: a score that does not exist is not replaced by another gene's.

A table identical to the model's own therefore gives the model's own outputs, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transcriptformer.data.vocab import GeneVocab, read_embedding_keys, read_embedding_table
from transcriptformer.errors import UserError
from transcriptformer.model.transcriptformer import TranscriptFormer


def build_swapped_table(
    vocab: GeneVocab, table: torch.Tensor, embedding_files: Sequence[str | Path]
) -> tuple[GeneVocab, torch.Tensor]:
    """The vocabulary and frozen table of a model whose genes come from ``embedding_files``.

    Parameters
    ----------
    vocab
        The model's current vocabulary; its special tokens are kept.
    table
        The model's current ``(V, width)`` table; the special tokens' rows are kept.
    embedding_files
        Gene-embedding ``.h5`` files (dataset ``keys``, group ``arrays``), all of width ``width``.

    Returns
    -------
    new_vocab, new_table
    """
    if not embedding_files:
        raise ValueError("no gene-embedding file given")
    keys = [read_embedding_keys(path) for path in embedding_files]
    new_vocab = GeneVocab.build(vocab.special_tokens, (gene for file_keys in keys for gene in file_keys))
    if len(new_vocab) == len(vocab.special_tokens):
        raise ValueError(f"the gene-embedding files {list(map(str, embedding_files))} hold no gene")

    n_special = len(vocab.special_tokens)
    new_table = np.zeros((len(new_vocab), table.shape[1]), dtype=np.float32)
    new_table[:n_special] = table[:n_special].detach().float().cpu().numpy()
    filled = np.zeros(len(new_vocab), dtype=bool)
    filled[:n_special] = True
    for path in embedding_files:
        ids, rows = read_embedding_table(path)
        if rows.shape[1] != table.shape[1]:
            raise ValueError(f"{path}: gene embeddings are {rows.shape[1]} wide, the model's are {table.shape[1]}")
        not_finite = np.flatnonzero(~np.isfinite(rows).all(axis=1))
        if not_finite.size:
            raise UserError(
                f"{path}: the gene embeddings of {not_finite.size} gene(s) hold NaN or infinite values (first: "
                f"{ids[not_finite[0]]}); build the file again (transcriptformer build-vocab) or remove those genes"
            )
        index = new_vocab.lookup(ids)
        _, first = np.unique(index, return_index=True)
        first = first[~filled[index[first]]]
        new_table[index[first]] = rows[first]
        filled[index[first]] = True
    return new_vocab, torch.from_numpy(new_table).to(device=table.device, dtype=table.dtype)


def remap_count_bias(bias: torch.Tensor, old_index: np.ndarray, n_special: int) -> torch.Tensor:
    """Per-gene count bias over a new vocabulary.

    Parameters
    ----------
    bias
        ``(V_old, 1)`` trained bias.
    old_index
        ``(V_new,)`` index of each new entry in the old vocabulary, ``-1`` for a gene the model never saw.
    n_special
        Number of special tokens, which lead both vocabularies.

    Returns
    -------
    Tensor
        ``(V_new, 1)``: the trained row of each known entry, the mean of the old genes' rows for a new gene.
    """
    index = torch.as_tensor(old_index, device=bias.device)
    known = (index >= 0)[:, None]
    mean_gene_bias = bias[n_special:].mean(0, keepdim=True)
    return torch.where(known, bias[index.clamp(min=0)], mean_gene_bias)


def swap_gene_embeddings(model: TranscriptFormer, vocab: GeneVocab, embedding_files: Sequence[str | Path]) -> GeneVocab:
    """Make a model run on the genes of other gene-embedding files (in place).

    Parameters
    ----------
    model
        A model as loaded (not swapped before); it is modified in place.
    vocab
        The model's vocabulary.
    embedding_files
        One or more gene-embedding ``.h5`` files, for example another species' ``<species>_gene.h5``.

    Returns
    -------
    GeneVocab
        The new vocabulary, to tokenize cells with.
    """
    if model.gene_head_classes is not None:
        raise ValueError("this model's gene embeddings were swapped already; swap those of a freshly loaded checkpoint")
    embedding = model.gene_embeddings.embedding
    new_vocab, new_table = build_swapped_table(vocab, embedding.weight, embedding_files)
    old_index = vocab.lookup(list(new_vocab.index))

    model.gene_embeddings.embedding = nn.Embedding.from_pretrained(new_table, freeze=True)
    with torch.no_grad():
        bias = remap_count_bias(model.mu.gene_embedding.weight, old_index, len(new_vocab.special_tokens))
    model.mu.gene_embedding = nn.Embedding.from_pretrained(bias, freeze=False)
    model.gene_head_classes = torch.as_tensor(old_index, device=new_table.device)
    return new_vocab
