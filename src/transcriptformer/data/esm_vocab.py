"""Gene-embedding tables for a new species: a protein FASTA and a local ESM-2 model -> ``<species>_gene.h5``.

One vector per gene: the mean, over the residues of the gene's longest protein isoform, of one ESM-2 layer's
output. The gene id comes from each FASTA header through a rule (:data:`GENE_ID_RULES` or a regular expression
with one group). The file has the layout of SPEC section 2 (dataset ``keys``, group ``arrays``) and can be given
to a model in place of its own table (:func:`transcriptformer.model.gene_swap.swap_gene_embeddings`).

The defaults follow how the published tables were made: ``esm2_t36_3B_UR50D`` (width 2560, which the published
models expect), layer 33, proteins truncated to 1022 residues. Unlike the original script, which kept the first
FASTA record of each gene, the longest isoform is used.

The ESM-2 checkpoint is a fair-esm ``.pt`` file, read by :func:`~transcriptformer.safe_load.load_torch_file`: tensors
and its ``argparse.Namespace`` of settings only, never arbitrary pickled objects.
"""

from __future__ import annotations

import argparse
import gzip
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transcriptformer.config import CONFIG_FILE, VOCAB_DIR, check_number
from transcriptformer.console import progress_bar
from transcriptformer.data.vocab import write_embedding_table
from transcriptformer.errors import UserError
from transcriptformer.safe_load import load_torch_file

if TYPE_CHECKING:
    import esm
    import torch

# torch, fair-esm and anndata are imported by the functions that use them, so that the command line can show
# this module's defaults without loading them.

GENE_ID_RULES = {
    "ensembl": r"\bgene:(\S+)",  # Ensembl peptide FASTA: >ENSP... pep ... gene:ENSG00000139618.17 transcript:...
    "gene_symbol": r"\bgene_symbol:(\S+)",  # the symbol field of the same headers
    "uniprot": r"\bGN=(\S+)",  # UniProt: >sp|P51587|BRCA2_HUMAN ... GN=BRCA2 PE=1 SV=3
    "ncbi": r"\[gene=([^\]]+)\]",  # NCBI translated CDS: >lcl|NC_000013.11_prot_NP_000050.3_1 [gene=BRCA2] ...
    "first_word": r"^(\S+)",  # the header's first word
}
ESM2_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t36_3B_UR50D.pt"
DEFAULT_LAYER = 33
DEFAULT_MAX_RESIDUES = 1022
STANDARD_RESIDUES = frozenset("LAGVSERTIDPKQNFYMHWCXBUZO")
TABLE_SUFFIX = "_gene.h5"
# A species name becomes a file name: letters, digits, '_', '.', '-', not starting with '.'.
SPECIES_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ProteinSet:
    """The longest protein of each gene of a FASTA file.

    Attributes
    ----------
    sequences : dict
        Gene id -> cleaned sequence, genes in order of first appearance.
    n_records : int
        FASTA records read.
    n_without_id : int
        Records whose header the gene-id rule did not match (skipped).
    """

    sequences: dict[str, str]
    n_records: int
    n_without_id: int


@dataclass(frozen=True)
class VocabReport:
    """What :func:`build_vocab` wrote.

    Attributes
    ----------
    path : Path
        The ``.h5`` file.
    n_records, n_without_id : int
        See :class:`ProteinSet`.
    n_genes : int
        Genes with a vector.
    n_truncated : int
        Genes whose longest protein was cut to ``max_residues``.
    width : int
        Vector width (the ESM-2 model's).
    data_genes, data_covered : int or None
        Genes of the checked dataset, and how many of them have a vector.
    """

    path: Path
    n_records: int
    n_without_id: int
    n_genes: int
    n_truncated: int
    width: int
    data_genes: int | None = None
    data_covered: int | None = None

    def summary(self) -> str:
        """Several lines for humans."""
        lines = [
            f"wrote {self.n_genes:,} gene vectors of width {self.width} to {self.path}",
            f"  {self.n_records:,} FASTA records, {self.n_without_id:,} without a gene id (skipped), "
            f"{self.n_truncated:,} genes truncated",
        ]
        if self.data_genes is not None:
            share = self.data_covered / self.data_genes if self.data_genes else 0.0
            lines.append(f"  coverage of the dataset: {self.data_covered:,} of {self.data_genes:,} genes ({share:.1%})")
        return "\n".join(lines)


def table_path(output_dir: str | Path, species: str) -> Path:
    """``<output_dir>/<species>_gene.h5``; a species name that is not a plain file name (``../x``, ``a/b``) is refused.

    Raises
    ------
    UserError
        When ``species`` holds anything but letters, digits, ``_``, ``.`` and ``-``, or starts with ``.``: the file
        would be written outside ``output_dir`` or hidden.
    """
    if not SPECIES_NAME.fullmatch(species):
        raise UserError(
            f"species {species!r} must be a plain name (letters, digits, '_', '.', '-'; e.g. xenopus_tropicalis): it "
            f"names the file <species>{TABLE_SUFFIX} inside output_dir"
        )
    return Path(output_dir) / f"{species}{TABLE_SUFFIX}"


def check_output_free(output: Path, overwrite: bool) -> None:
    """Refuse to replace an existing table without ``overwrite``, and a checkpoint's own table in any case.

    A table in a checkpoint's ``vocabs/`` folder is part of that checkpoint: its weights were trained with it.
    """
    if output.is_dir():
        raise UserError(f"{output} is a folder; choose another species or output_dir")
    if not output.exists():
        return
    in_checkpoint = output.parent.name == VOCAB_DIR and (output.parent.parent / CONFIG_FILE).is_file()
    if in_checkpoint:
        raise UserError(
            f"{output} is a gene-embedding table of the checkpoint {output.parent.parent}, whose weights were trained "
            "with it: replacing it would break the checkpoint; write the new table to another output_dir"
        )
    if not overwrite:
        raise UserError(f"{output} already exists; choose another species or output_path, or pass `overwrite=True`")


def read_fasta(path: str | Path) -> Iterator[tuple[str, str]]:
    """``(header, sequence)`` of each record of a FASTA file (plain or ``.gz``), header without ``>``."""
    opener = gzip.open if str(path).endswith(".gz") else open
    header, parts = None, []
    with opener(path, "rt") as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if header is not None:
                    yield header, "".join(parts)
                header, parts = line[1:], []
            elif line:
                if header is None:
                    raise ValueError(f"{path}: sequence data before the first '>' header; is this a FASTA file?")
                parts.append(line)
    if header is not None:
        yield header, "".join(parts)


def gene_id_pattern(rule: str) -> re.Pattern[str]:
    """The regular expression of a named rule, or ``rule`` itself, which must have one capturing group."""
    pattern = re.compile(GENE_ID_RULES.get(rule, rule))
    if pattern.groups != 1:
        raise ValueError(
            f"gene id rule {rule!r} must be one of {', '.join(GENE_ID_RULES)} or a regular expression with exactly "
            "one capturing group"
        )
    return pattern


def clean_sequence(sequence: str) -> str:
    """Upper case, no trailing stop ``*``; anything ESM-2 does not know becomes ``X`` (unknown residue)."""
    sequence = sequence.upper().rstrip("*")
    return "".join(c if c in STANDARD_RESIDUES else "X" for c in sequence)


def longest_isoforms(fasta: str | Path, rule: str = "ensembl", strip_version: bool = True) -> ProteinSet:
    """The longest protein of each gene (the first one on ties), genes in order of first appearance."""
    pattern = gene_id_pattern(rule)
    sequences: dict[str, str] = {}
    n_records = n_without_id = 0
    for header, sequence in read_fasta(fasta):
        n_records += 1
        match = pattern.search(header)
        if not match:
            n_without_id += 1
            continue
        gene = match.group(1).split(".", 1)[0] if strip_version else match.group(1)
        sequence = clean_sequence(sequence)
        if len(sequence) > len(sequences.get(gene, "")):
            sequences[gene] = sequence
    if not sequences:
        raise ValueError(
            f"{fasta}: none of the {n_records} FASTA headers matched the gene id rule {rule!r}; "
            f"choose another rule ({', '.join(GENE_ID_RULES)}) or give a regular expression"
        )
    return ProteinSet(sequences, n_records, n_without_id)


def load_esm2(path: str | Path) -> tuple[esm.ESM2, esm.Alphabet]:
    """A fair-esm ESM-2 checkpoint (``esm2_*.pt``), read safely; the model is in eval mode on the CPU.

    ``path`` may also be a model name (``esm2_t36_3B_UR50D``) already in the torch hub cache, where fair-esm
    stores the files it downloads.
    """
    import esm  # fair-esm is needed by this command only
    import torch

    path = Path(path)
    if not path.exists() and path.suffix != ".pt":
        path = Path(torch.hub.get_dir()) / "checkpoints" / f"{path.name}.pt"
    if not path.exists():
        raise FileNotFoundError(f"no ESM-2 checkpoint at {path}; download one, e.g. {ESM2_URL}, and pass its path")
    data = load_torch_file(
        path,
        what="an ESM-2 checkpoint",
        fix=f"use a file of fair-esm's releases, e.g. {ESM2_URL}",
        allowed_globals=[argparse.Namespace],
    )
    if not isinstance(data, Mapping) or "cfg" not in data or "model" not in data:
        raise ValueError(f"{path} is not a fair-esm ESM-2 checkpoint (expected the keys 'cfg' and 'model')")
    weights = data["model"]
    if (
        not isinstance(weights, Mapping)
        or not weights
        or not all(isinstance(v, torch.Tensor) for v in weights.values())
    ):
        raise ValueError(
            f"{path} holds no ESM-2 weights (its 'model' entry is not a non-empty set of tensors); use a file of "
            f"fair-esm's releases, e.g. {ESM2_URL}"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Regression weights not found")  # contact head, unused here
        try:
            model, alphabet = esm.pretrained.load_model_and_alphabet_core("esm2", data)
        except (RuntimeError, KeyError, TypeError, AttributeError, ValueError) as error:
            reason = " ".join(str(error).split())[:160]
            raise ValueError(
                f"{path} is not a complete ESM-2 checkpoint: its settings and weights do not make a model "
                f"({reason}...); use a file of fair-esm's releases, e.g. {ESM2_URL}"
            ) from None
    bad = [
        name for name, value in model.state_dict().items() if value.is_floating_point() and not value.isfinite().all()
    ]
    if bad:
        raise ValueError(f"{path}: ESM-2 weights hold NaN or infinite values (first: {bad[0]}); the file is damaged")
    return model.eval(), alphabet


def batches_by_tokens(lengths: Mapping[str, int], tokens_per_batch: int) -> list[list[str]]:
    """Group genes, longest first, so that each padded batch holds at most ``tokens_per_batch`` tokens."""
    batches: list[list[str]] = []
    for gene in sorted(lengths, key=lambda g: -lengths[g]):
        current = batches[-1] if batches else None
        if current and (len(current) + 1) * lengths[current[0]] <= tokens_per_batch:
            current.append(gene)
        else:
            batches.append([gene])
    return batches


def embed_proteins(
    model: esm.ESM2,
    alphabet: esm.Alphabet,
    sequences: Mapping[str, str],
    *,
    layer: int = DEFAULT_LAYER,
    max_residues: int = DEFAULT_MAX_RESIDUES,
    tokens_per_batch: int = 8192,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Mean of ``layer``'s output over the (first ``max_residues``) residues of each sequence.

    Parameters
    ----------
    model, alphabet
        From :func:`load_esm2`; the model may be on any device.
    sequences
        Gene id -> protein sequence.
    layer
        ESM-2 layer, 1 .. ``model.num_layers`` (the last one includes the final layer norm).
    max_residues
        Longer proteins are truncated.
    tokens_per_batch
        Upper bound on the padded tokens of one forward pass.

    Returns
    -------
    dict
        Gene id -> ``(width,)`` float32 vector, in the order of ``sequences``.
    """
    import torch

    check_embedding_settings(layer, max_residues, tokens_per_batch)
    if not 1 <= layer <= model.num_layers:
        raise ValueError(f"layer must be between 1 and {model.num_layers} for this ESM-2 model, got {layer}")
    device = next(model.parameters()).device
    convert = alphabet.get_batch_converter(truncation_seq_length=max_residues)
    lengths = {gene: min(len(seq), max_residues) + 2 for gene, seq in sequences.items()}  # with BOS and EOS
    vectors: dict[str, np.ndarray] = {}
    for batch in progress_bar(
        batches_by_tokens(lengths, tokens_per_batch), desc="ESM-2", unit="batch", disable=not progress
    ):
        _, _, tokens = convert([(gene, sequences[gene]) for gene in batch])
        with torch.no_grad():
            hidden = model(tokens.to(device), repr_layers=[layer])["representations"][layer].float().cpu()
        for row, gene in enumerate(batch):
            vectors[gene] = hidden[row, 1 : lengths[gene] - 1].mean(0).numpy()
    not_finite = [gene for gene, vector in vectors.items() if not np.isfinite(vector).all()]
    if not_finite:
        raise ValueError(
            f"ESM-2 gave NaN or infinite vectors for {len(not_finite)} of {len(vectors)} genes (first: "
            f"{not_finite[0]}), so no table was written: its activations overflow; use a file of fair-esm's "
            f"releases, e.g. {ESM2_URL}"
        )
    return {gene: vectors[gene] for gene in sequences}


def check_embedding_settings(layer: int, max_residues: int, tokens_per_batch: int) -> None:
    """Raise a ``ValueError`` naming the setting that is out of range (the layer's upper bound is the model's)."""
    check_number(layer, "layer", at_least=1)
    check_number(max_residues, "max_residues", at_least=1, also="residues of a protein that are embedded")
    check_number(tokens_per_batch, "tokens_per_batch", at_least=1)


def dataset_gene_ids(data: str | Path, gene_col_name: str) -> list[str]:
    """The distinct gene ids of a dataset, read as the tokenizer reads them."""
    from transcriptformer.data.sources import open_counts
    from transcriptformer.data.tokenize import gene_ids_from_var

    with open_counts(data) as reader:
        var = reader.var
    return list(gene_ids_from_var(var, gene_col_name).dropna().unique())


def build_vocab(
    fasta: str | Path,
    esm_model: str | Path,
    output: str | Path,
    *,
    rule: str = "ensembl",
    strip_version: bool = True,
    layer: int = DEFAULT_LAYER,
    max_residues: int = DEFAULT_MAX_RESIDUES,
    tokens_per_batch: int = 8192,
    device: str | torch.device = "cpu",
    check_data: str | Path | None = None,
    gene_col_name: str = "ensembl_id",
    progress: bool = True,
    overwrite: bool = False,
) -> VocabReport:
    """FASTA + ESM-2 -> ``output`` (a ``<species>_gene.h5`` file), with a coverage report.

    Parameters
    ----------
    fasta
        Protein FASTA (plain or ``.gz``), several isoforms per gene allowed.
    esm_model
        fair-esm ESM-2 checkpoint (see :func:`load_esm2`).
    output
        File to write.
    rule
        How to read the gene id from a header: a name of :data:`GENE_ID_RULES` or a regex with one group.
    strip_version
        Drop a ``.N`` version suffix from gene ids, as the tokenizer does with the data's ids.
    layer, max_residues, tokens_per_batch
        See :func:`embed_proteins`.
    device
        Where ESM-2 runs.
    check_data, gene_col_name
        An ``.h5ad`` file and its gene-id column: report how many of its genes get a vector.
    progress
        Show a progress bar.
    overwrite
        Replace an existing ``output`` (never a table of a checkpoint's ``vocabs/``).

    Every input and setting is checked before ESM-2 runs; the table is written last, atomically (a temporary
    file renamed), and only when every vector is finite.
    """
    output = Path(output)
    check_output_free(output, overwrite)
    check_embedding_settings(layer, max_residues, tokens_per_batch)
    data_ids = dataset_gene_ids(check_data, gene_col_name) if check_data else None
    proteins = longest_isoforms(fasta, rule, strip_version)
    model, alphabet = load_esm2(esm_model)
    vectors = embed_proteins(
        model.to(device),
        alphabet,
        proteins.sequences,
        layer=layer,
        max_residues=max_residues,
        tokens_per_batch=tokens_per_batch,
        progress=progress,
    )
    write_embedding_table(output, vectors)
    return VocabReport(
        path=output,
        n_records=proteins.n_records,
        n_without_id=proteins.n_without_id,
        n_genes=len(vectors),
        n_truncated=sum(len(s) > max_residues for s in proteins.sequences.values()),
        width=model.embed_dim,
        data_genes=None if data_ids is None else len(data_ids),
        data_covered=None if data_ids is None else sum(gene in vectors for gene in data_ids),
    )
