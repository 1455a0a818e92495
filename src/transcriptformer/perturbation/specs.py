"""Perturbations as the user writes them (``Gad1``, ``ENSMUSG00000070880=20``, ``Gad1+Gad2``), parsed and resolved.

A perturbation edits one or more genes of every cell: a knock-out sets the gene's count to 0, an over-expression
to a given count or, by default, to the cell's highest count. Genes are named by a gene id of the checkpoint's
vocabulary (an Ensembl id's version suffix is dropped) or by a symbol of the bundled human and mouse tables
(:mod:`transcriptformer.data.gene_symbols`), matched exactly, then ignoring case; a perturbation is named by the
symbols as the tables write them (``sox10`` gives ``ko:Sox10``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from transcriptformer.data.gene_symbols import GeneNames
from transcriptformer.data.vocab import GeneVocab

KNOCK_OUT, OVER_EXPRESS = "knock_out", "over_express"
# Prefix of a perturbation's name, by kind.
NAME_PREFIX = {KNOCK_OUT: "ko", OVER_EXPRESS: "oe"}
# Genes of one perturbation are joined with this; an over-expression's count follows its gene after COUNT_SEPARATOR.
GENE_SEPARATOR, COUNT_SEPARATOR = "+", "="


@dataclass(frozen=True)
class Edit:
    """One gene's new count in every cell.

    Attributes
    ----------
    gene_id : str
        Ensembl id, in the checkpoint's vocabulary.
    count : float or None
        The gene's new count: 0 for a knock-out; ``None``: the cell's highest count (over the genes read).
    """

    gene_id: str
    count: float | None


@dataclass(frozen=True)
class Perturbation:
    """Edits applied together to every cell, named as written (``ko:Gad1``, ``oe:Gad1=20``).

    Attributes
    ----------
    name : str
        ``ko:`` or ``oe:`` and the text the user wrote.
    kind : {"knock_out", "over_express"}
    edits : tuple of Edit
    """

    name: str
    kind: str
    edits: tuple[Edit, ...]

    @property
    def gene_ids(self) -> tuple[str, ...]:
        """The genes it edits."""
        return tuple(edit.gene_id for edit in self.edits)


def parse_count(text: str, flag: str, spec: str) -> float:
    """A count written after ``GENE=``: a finite number above 0 that a count matrix (float32) holds as such.

    A count that float32 rounds to 0 (``1e-300``) would knock the gene out under an over-expression's name, and one
    it rounds to infinity would make every output of the cell non-finite.
    """
    try:
        count = float(text)
    except ValueError:
        count = math.nan
    as_stored = float(np.float32(count)) if math.isfinite(count) and abs(count) < 1e39 else math.inf
    if not (math.isfinite(as_stored) and as_stored > 0):
        raise ValueError(
            f"{flag} {spec!r}: the count {text!r} is not a number above 0 that a count matrix (float32) holds; "
            "write GENE=COUNT (GENE=20), or GENE alone for the cell's highest count"
        )
    return count


def parse_perturbation(spec: str, kind: str, names: GeneNames) -> Perturbation:
    """One perturbation from its text (``Gad1``, ``Gad1=20``, ``Gad1+Gad2``) and its kind."""
    edits, written = [], []
    for part in spec.split(GENE_SEPARATOR):
        name, has_count, count_text = part.strip().partition(COUNT_SEPARATOR)
        name = name.strip()
        if not name:
            raise ValueError(f"{kind} {spec!r}: a gene name is missing; name genes by Ensembl id or symbol")
        if kind == KNOCK_OUT and has_count:
            raise ValueError(f"{kind} {spec!r}: a knock-out takes no count; use over_express GENE=COUNT to set one")
        count = 0.0 if kind == KNOCK_OUT else parse_count(count_text.strip(), kind, spec) if has_count else None
        edits.append(Edit(names.resolve(name, kind, spec), count))
        written.append(names.canonical(name) + (COUNT_SEPARATOR + count_text.strip() if has_count else ""))
    genes = [edit.gene_id for edit in edits]
    if len(set(genes)) < len(genes):
        raise ValueError(f"{kind} {spec!r} names a gene twice; name each gene once")
    return Perturbation(f"{NAME_PREFIX[kind]}:{GENE_SEPARATOR.join(written)}", kind, tuple(edits))


def parse_perturbations(
    knock_out: Sequence[str], over_express: Sequence[str], vocab: GeneVocab, input_var: pd.DataFrame | None = None
) -> list[Perturbation]:
    """The perturbations of ``knock_out`` then ``over_express``, each once, genes resolved in ``vocab``.

    ``input_var``: the var of the input files, so that a gene the vocabulary lacks is said to be in them or not.
    """
    names = GeneNames(vocab, input_var)
    specs = [(spec, KNOCK_OUT) for spec in knock_out] + [(spec, OVER_EXPRESS) for spec in over_express]
    perturbations = {}
    for spec, kind in specs:
        perturbation = parse_perturbation(spec, kind, names)
        perturbations.setdefault(perturbation.name, perturbation)
    return list(perturbations.values())
