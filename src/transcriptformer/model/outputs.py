"""The model's outputs, declared once: what each is, what it needs, which positions it scores, where it is written.

Every use of the model (the Python API, ``transcriptformer inference``) reads this table; no other module lists
outputs. An output is either

* per cell (``level="cell"``): a number or a vector for each cell, or
* per gene (``level="gene"``): a number or a vector for each position of a cell's sequence, that is for each of
  the cell's genes; in an AnnData it is keyed by gene.

Which positions of a per-gene output hold a value of the gene at that position is decided by
:func:`gene_positions`, with the one rule about the end of a full-length sequence (:func:`end_target_position`).

This module imports nothing heavy, so that the command line can offer the outputs without loading torch.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

Level = Literal["cell", "gene"]
Head = Literal["count", "gene_id"]
# Where an output goes in an AnnData: obs column, obsm array, sparse cells x genes layer, or the table of
# contextual gene embeddings (uns["cge_embeddings"], uns["cge_cell_indices"], uns["cge_gene_names"]).
Slot = Literal["obs", "obsm", "layers", "cge"]


@dataclass(frozen=True)
class OutputSpec:
    """One output of the model.

    Attributes
    ----------
    name : str
        The key in results, flags and files.
    level : {"cell", "gene"}
        One value per cell, or one per gene of a cell.
    description : str
        What it is, with its shape for ``B`` cells of ``L`` positions and width ``E``.
    anndata : {"obs", "obsm", "layers", "cge"}
        Where it is written in an AnnData.
    heads : tuple of {"count", "gene_id"}
        The model heads it needs (none: the transformer alone).
    scores_targets : bool
        A per-gene output that scores each position's prediction target: the position whose target is
        ``[END]`` (:func:`end_target_position`) holds no value of its gene.
    may_be_nan : bool
        NaN marks a value that does not exist (``gene_llh`` of a gene the gene-id head has no class for, after a
        gene-table swap); elsewhere a NaN is an error.
    """

    name: str
    level: Level
    description: str
    anndata: Slot
    heads: tuple[Head, ...] = ()
    scores_targets: bool = False
    may_be_nan: bool = False


def _score(name: str, description: str, heads: tuple[Head, ...] = ("gene_id", "count")) -> OutputSpec:
    """A log-likelihood output: per gene when ``description`` gives a ``(B, L)`` shape, else per cell."""
    level: Level = "gene" if description.startswith("(B, L)") else "cell"
    return OutputSpec(
        name,
        level,
        description,
        "layers" if level == "gene" else "obs",
        heads=heads,
        scores_targets=level == "gene",
        may_be_nan="gene_id" in heads,
    )


OUTPUTS: dict[str, OutputSpec] = {
    spec.name: spec
    for spec in (
        OutputSpec("embeddings", "cell", "(B, E) cell embedding: mean of the last layer over the positions", "obsm"),
        OutputSpec(
            "llh", "cell", "(B,) mean count negative log-likelihood over the cell's genes", "obs", heads=("count",)
        ),
        OutputSpec(
            "gene_llh",
            "gene",
            "(B, L) gene-id cross-entropy of each position's gene",
            "layers",
            heads=("gene_id",),
            scores_targets=True,
            may_be_nan=True,
        ),
        OutputSpec("mu", "gene", "(B, L) expected count of each position's gene", "layers", heads=("count",)),
        OutputSpec("cge", "gene", "(B, L, E) contextual gene embedding of each position's gene", "cge"),
        # The generative scores: log-likelihoods in nats, higher = more likely (docs/score.md). A cell's score sums
        # its positions, the [END] target of a full-length cell included; the per-gene scores leave that one out.
        _score("log_likelihood", "(B,) the cell's log-likelihood: gene identities and counts, summed"),
        _score("log_likelihood_gene_id", "(B,) the cell's log-likelihood of its gene identities", ("gene_id",)),
        _score("log_likelihood_count", "(B,) the cell's log-likelihood of its counts, given the genes", ("count",)),
        _score("mean_log_likelihood", "(B,) log_likelihood / the cell's number of positions (per-gene mean)"),
        _score("gene_log_likelihood", "(B, L) log-likelihood of each position's gene: identity and count"),
        _score("gene_log_likelihood_gene_id", "(B, L) log-likelihood of each position's gene identity", ("gene_id",)),
        _score("gene_log_likelihood_count", "(B, L) log-likelihood of each position's count", ("count",)),
    )
}
OUTPUT_KEYS = tuple(OUTPUTS)
# The outputs of ``transcriptformer score``.
SCORE_KEYS = tuple(key for key in OUTPUT_KEYS if "log_likelihood" in key)
# What ``transcriptformer perturb`` compares between a perturbed cell and the cell (transcriptformer.perturbation).
PERTURBATION_KEYS = ("embeddings", "mu", "log_likelihood", "mean_log_likelihood")
# What ``transcriptformer screen`` compares: per cell only (pairs x genes of per-gene effects would not fit).
SCREEN_KEYS = ("embeddings", "log_likelihood", "mean_log_likelihood")
# The per-gene layers in the order in which an AnnData's main matrix X takes them: the expected counts first, the
# closest to the expression matrix that scanpy's functions on X expect.
MAIN_MATRIX_ORDER = (
    "mu",
    "gene_llh",
    "gene_log_likelihood",
    "gene_log_likelihood_gene_id",
    "gene_log_likelihood_count",
)


def end_target_position(seq_len: int) -> int:
    """The position whose prediction target is ``[END]`` (count 1) instead of its own gene.

    This is the one place of the rule: the last position of a full-length sequence, ``seq_len - 1``. A batch
    trimmed to a shorter length has padding there, so trimming never changes a target.
    """
    return seq_len - 1


def check_output_keys(keys: Collection[str], available: Collection[str] = OUTPUT_KEYS) -> None:
    """Raise a ``ValueError`` naming the choices when ``keys`` is empty or has a name outside ``available``."""
    if not keys:
        raise ValueError(f"no output asked for; choose from {list(available)}")
    unknown = [key for key in keys if key not in OUTPUTS]
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; choose from {list(OUTPUT_KEYS)}")
    unavailable = [key for key in keys if key not in available]
    if unavailable:
        raise ValueError(f"this model cannot compute {unavailable}; it computes {list(available)}")


def main_matrix_key(layers: Collection[str]) -> str | None:
    """The per-gene layer among ``layers`` that an AnnData's ``X`` holds (:data:`MAIN_MATRIX_ORDER`), if any."""
    return next((key for key in MAIN_MATRIX_ORDER if key in layers), None)


def available_outputs(heads: Collection[Head]) -> tuple[str, ...]:
    """The outputs that a model with ``heads`` computes, in :data:`OUTPUT_KEYS` order."""
    return tuple(key for key in OUTPUT_KEYS if set(OUTPUTS[key].heads) <= set(heads))


def needs_head(keys: Collection[str], head: Head) -> bool:
    """Whether any of the outputs ``keys`` needs ``head``."""
    return any(head in OUTPUTS[key].heads for key in keys)


def gene_positions(key: str, gene_tokens: Any, pad_index: int, seq_len: int) -> Any:
    """``(B, L)`` bool: the positions at which the per-gene output ``key`` holds a value of the gene there.

    Every position holding a gene, except, for an output that scores targets, the end-target position.
    Works on NumPy arrays and torch tensors alike.
    """
    holds_gene = gene_tokens != pad_index
    if OUTPUTS[key].scores_targets:
        end = end_target_position(seq_len)
        if end < gene_tokens.shape[1]:
            holds_gene[:, end] = False
    return holds_gene
