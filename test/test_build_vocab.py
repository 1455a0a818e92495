import argparse
import shutil
from pathlib import Path

import anndata as ad
import esm
import h5py
import numpy as np
import pytest
import torch
from filelock import FileLock

from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.cli import main
from transcriptformer.data.esm_vocab import (
    batches_by_tokens,
    build_vocab,
    clean_sequence,
    gene_id_pattern,
    load_esm2,
    longest_isoforms,
)
from transcriptformer.data.vocab import build_gene_vocab, partial_table_of, read_embedding_table
from transcriptformer.engine.output import lock_file_of

REFERENCE = Path(__file__).parent / "data" / "reference_tiny"
LAYERS, WIDTH = 2, 32  # the reference checkpoint's ESM width is 32, so the table can be swapped into it
SPECIAL = ["unknown", "[PAD]", "[START]", "[END]", "[RD]", "[CELL]", "[MASK]"]


def random_protein(rng: np.random.Generator, length: int) -> str:
    return "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), length))


@pytest.fixture(scope="module")
def genes() -> list[str]:
    """Three mouse genes of the reference cells, so the table can be used on them."""
    return list(ad.read_h5ad(REFERENCE / "input.h5ad").var["ensembl_id"][:3])


@pytest.fixture(scope="module")
def proteins(genes) -> dict[str, str]:
    rng = np.random.default_rng(0)
    return {
        "a_short": random_protein(rng, 40),
        "a_long": random_protein(rng, 90),
        "b": random_protein(rng, 25).lower() + "*",
        "c": random_protein(rng, 130),
    }


@pytest.fixture(scope="module")
def fasta(tmp_path_factory, genes, proteins) -> Path:
    """Ensembl-style peptide FASTA: two isoforms of gene 0, a stop codon, a header without gene, wrapped lines."""
    a, b, c = genes

    def entry(protein_id, gene, sequence):
        tag = f" gene:{gene}.4 transcript:ENSMUST0000{protein_id}.1 gene_biotype:protein_coding" if gene else ""
        lines = [sequence[i : i + 60] for i in range(0, len(sequence), 60)]
        return f">ENSMUSP0000{protein_id}.1 pep chromosome:GRCm39:1:1:100:1{tag}\n" + "\n".join(lines) + "\n"

    text = (
        entry(1, a, proteins["a_short"])
        + entry(2, b, proteins["b"])
        + entry(3, None, "MKV")
        + entry(4, a, proteins["a_long"])
        + entry(5, c, proteins["c"])
    )
    path = tmp_path_factory.mktemp("fasta") / "tiny.pep.all.fa"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def esm_file(tmp_path_factory) -> tuple[Path, esm.ESM2]:
    """A tiny randomly initialised ESM-2, saved like a fair-esm checkpoint."""
    torch.manual_seed(0)
    model = esm.ESM2(num_layers=LAYERS, embed_dim=WIDTH, attention_heads=4, alphabet="ESM-1b").eval()
    settings = argparse.Namespace(
        encoder_layers=LAYERS, encoder_embed_dim=WIDTH, encoder_attention_heads=4, token_dropout=True
    )
    state = {f"encoder.sentence_encoder.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("esm") / "esm2_t2_tiny.pt"
    torch.save({"cfg": {"model": settings}, "model": state}, path)
    return path, model


def mean_embedding(model: esm.ESM2, sequence: str, layer: int = LAYERS) -> np.ndarray:
    """Reference: one sequence alone, mean over its residues."""
    alphabet = esm.Alphabet.from_architecture("ESM-1b")
    tokens = torch.tensor([[alphabet.cls_idx, *alphabet.encode(sequence), alphabet.eos_idx]])
    with torch.no_grad():
        hidden = model(tokens, repr_layers=[layer])["representations"][layer]
    return hidden[0, 1:-1].mean(0).numpy()


def test_gene_id_rules():
    ensembl = "ENSP00000369497.3 pep chromosome:GRCh38:13:1:2:1 gene:ENSG00000139618.17 gene_symbol:BRCA2"
    assert gene_id_pattern("ensembl").search(ensembl).group(1) == "ENSG00000139618.17"
    assert gene_id_pattern("gene_symbol").search(ensembl).group(1) == "BRCA2"
    uniprot = "sp|P51587|BRCA2_HUMAN Breast cancer type 2 OS=Homo sapiens OX=9606 GN=BRCA2 PE=1 SV=3"
    assert gene_id_pattern("uniprot").search(uniprot).group(1) == "BRCA2"
    assert (
        gene_id_pattern("ncbi").search("lcl|NC_000013.11_prot_NP_000050.3_1 [gene=BRCA2] [protein=x]").group(1)
        == "BRCA2"
    )
    assert gene_id_pattern(r"locus=(\w+)").search("p1 locus=At1g01010").group(1) == "At1g01010"
    with pytest.raises(ValueError, match="exactly one capturing group"):
        gene_id_pattern(r"gene:\S+")


def test_longest_isoform_per_gene(fasta, genes, proteins):
    found = longest_isoforms(fasta)
    assert list(found.sequences) == genes  # order of first appearance, version suffix dropped
    assert found.sequences[genes[0]] == proteins["a_long"]
    assert found.sequences[genes[1]] == proteins["b"][:-1].upper()
    assert (found.n_records, found.n_without_id) == (5, 1)
    assert clean_sequence("mk*v?j*") == "MKXVXX"
    with pytest.raises(ValueError, match="none of the 5 FASTA headers matched the gene id rule 'uniprot'"):
        longest_isoforms(fasta, rule="uniprot")


def test_batches_respect_the_token_budget():
    lengths = {"a": 100, "b": 90, "c": 50, "d": 40, "e": 300}
    batches = batches_by_tokens(lengths, tokens_per_batch=200)
    assert batches == [["e"], ["a", "b"], ["c", "d"]]
    assert sorted(g for b in batches for g in b) == sorted(lengths)


def test_build_vocab_writes_mean_embeddings_of_the_longest_isoform(tmp_path, fasta, esm_file, genes, proteins):
    model_path, model = esm_file
    out = tmp_path / "tiny_species_gene.h5"
    report = build_vocab(fasta, model_path, out, layer=LAYERS, max_residues=100, tokens_per_batch=150, progress=False)
    assert (report.n_genes, report.n_records, report.n_without_id, report.n_truncated) == (3, 5, 1, 1)
    assert report.width == WIDTH

    with h5py.File(out, "r") as f:  # SPEC section 2 layout
        assert [k.decode() for k in f["keys"][:]] == genes
        assert sorted(f["arrays"]) == sorted(genes)
    ids, table = read_embedding_table(out)
    assert ids == genes and table.shape == (3, WIDTH) and table.dtype == np.float32

    # Batched, padded and truncated embedding equals each protein embedded on its own.
    expected = [
        mean_embedding(model, proteins["a_long"]),
        mean_embedding(model, proteins["b"][:-1].upper()),
        mean_embedding(model, proteins["c"][:100]),
    ]
    np.testing.assert_allclose(table, np.stack(expected), rtol=1e-4, atol=1e-5)
    assert not np.allclose(table[0], mean_embedding(model, proteins["a_short"]), atol=1e-3)

    vocab = build_gene_vocab(SPECIAL, [out])
    assert [vocab[g] for g in genes] == [7, 8, 9]


def test_new_table_runs_in_a_model(tmp_path, fasta, esm_file, genes):
    out = tmp_path / "tiny_species_gene.h5"
    build_vocab(fasta, esm_file[0], out, layer=LAYERS, progress=False)
    checkpoint = load_checkpoint(REFERENCE).with_gene_embeddings([out])
    assert checkpoint.gene_vocab.gene_ids == genes
    cells = checkpoint.tokenizer().tokenize(REFERENCE / "input.h5ad")
    assert list(cells.gene_ids) == genes
    batch = cells.batch(np.arange(len(cells)))
    outputs = checkpoint.model.predict(batch.gene_tokens, batch.gene_counts, batch.aux_tokens, ["embeddings", "mu"])
    assert outputs["embeddings"].shape == (len(cells), 64) and torch.isfinite(outputs["embeddings"]).all()


class Trap:
    """Unpickling this object would create a file: what a hostile checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoints_are_loaded_safely(tmp_path, esm_file):
    plain = tmp_path / "plain.pt"
    torch.save(esm_file[1].state_dict(), plain)
    with pytest.raises(ValueError, match="not a fair-esm ESM-2 checkpoint"):
        load_esm2(plain)
    hostile = tmp_path / "esm2_hostile.pt"
    torch.save({"cfg": {"model": Trap(tmp_path / "pwned")}, "model": {}}, hostile)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_esm2(hostile)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(FileNotFoundError, match="no ESM-2 checkpoint"):
        load_esm2(tmp_path / "missing.pt")


def test_cli_reports_coverage(tmp_path, fasta, esm_file, capsys):
    # --output-dir: the former name of --output-path, which still works
    args = ["build-vocab", "--fasta", str(fasta), "--esm-model", str(esm_file[0]), "--species", "tiny_species",
            "--output-dir", str(tmp_path), "--layer", "2", "--device", "cpu", "--no-progress",
            "--check-data", str(REFERENCE / "input.h5ad")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"wrote 3 gene vectors of width {WIDTH} to {tmp_path / 'tiny_species_gene.h5'}" in out
    assert "5 FASTA records, 1 without a gene id (skipped), 0 genes truncated" in out
    assert "coverage of the dataset: 3 of 1,122 genes (0.3%)" in out
    assert out.splitlines()[-1] == f"Output: {(tmp_path / 'tiny_species_gene.h5').resolve()}"
    assert main([*args[:-2], "--layer", "3", "--overwrite"]) == 1
    assert "layer must be between 1 and 2" in capsys.readouterr().err


def esm_variant(esm_file, folder: Path, change) -> Path:
    """A copy of the tiny ESM-2 file whose weights ``change(weights)`` edits in place."""
    data = torch.load(esm_file[0], weights_only=False)  # the test's own file
    change(data["model"])
    path = folder / "esm2_edited.pt"
    torch.save(data, path)
    return path


def build_args(fasta, esm_model, output_path, *extra) -> list[str]:
    return [str(arg) for arg in ["build-vocab", "--fasta", fasta, "--esm-model", esm_model, "--species", "tiny_species",
            "--output-path", output_path, "--layer", "2", "--device", "cpu", "--no-progress", *extra]]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--max-residues", "0"], ["--max-residues must be >= 1", "got 0"]),  # all-NaN vectors before
        (["--max-residues", "-5"], ["--max-residues"]),
        (["--tokens-per-batch", "0"], ["--tokens-per-batch must be >= 1"]),
        (["--layer", "0"], ["layer must be >= 1"]),
        (["--species", "../escaped"], ["species '../escaped' must be a plain name", "--output-path"]),
        (["--species", "a/b"], ["species 'a/b'"]),
        (["--species", ".hidden"], ["species '.hidden'"]),
        (["--species", ""], ["species ''"]),
        (["--check-data", "missing.h5ad"], ["missing.h5ad"]),
    ],
)
def test_cli_mistakes_are_one_line_errors_and_write_nothing(tmp_path, capsys, fasta, esm_file, extra, words):
    out = tmp_path / "out"
    code, err = run_cli(capsys, *build_args(fasta, esm_file[0], out, *extra))
    assert_one_line_error(code, err, "build-vocab", *words)
    assert not list(tmp_path.rglob("*.h5"))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda weights: weights.clear(), ["holds no ESM-2 weights"]),
        (lambda weights: [weights.pop(k) for k in list(weights)[::2]], ["not a complete ESM-2 checkpoint"]),
        (lambda weights: weights["encoder.sentence_encoder.layers.0.fc1.bias"].fill_(float("nan")), ["NaN"]),
        # finite weights whose activations overflow: the vectors are checked before the table is written
        (lambda weights: weights["encoder.sentence_encoder.layers.0.fc1.weight"].mul_(1e36), ["infinite vectors"]),
    ],
)
def test_broken_esm_files_are_one_line_errors(tmp_path, capsys, fasta, esm_file, change, words):
    broken = esm_variant(esm_file, tmp_path, change)
    code, err = run_cli(capsys, *build_args(fasta, broken, tmp_path / "out"))
    assert_one_line_error(code, err, "build-vocab", *words)
    assert not list(tmp_path.rglob("*.h5"))


def test_an_existing_table_is_replaced_only_with_overwrite(tmp_path, capsys, fasta, esm_file):
    table = tmp_path / "tiny_species_gene.h5"
    table.write_bytes(b"a table of the user's")
    code, err = run_cli(capsys, *build_args(fasta, esm_file[0], tmp_path))
    assert_one_line_error(code, err, "build-vocab", "already exists", "--overwrite")
    assert table.read_bytes() == b"a table of the user's"
    assert main(build_args(fasta, esm_file[0], tmp_path, "--overwrite")) == 0
    assert read_embedding_table(table)[1].shape == (3, WIDTH)
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == [table.name]  # the temporary file was renamed


def test_a_checkpoints_own_table_is_never_replaced(tmp_path, capsys, fasta, esm_file):
    checkpoint = shutil.copytree(REFERENCE, tmp_path / "checkpoint")
    table = checkpoint / "vocabs" / "mus_musculus_gene.h5"
    before = table.read_bytes()
    args = build_args(fasta, esm_file[0], checkpoint / "vocabs", "--overwrite")
    args[args.index("tiny_species")] = "mus_musculus"
    code, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "build-vocab", "table of the checkpoint", "break the checkpoint")
    assert table.read_bytes() == before
    load_checkpoint(checkpoint)  # still whole


def test_a_table_being_written_by_another_run_is_refused(tmp_path, capsys, fasta, esm_file):
    table = tmp_path / "tiny_species_gene.h5"
    with FileLock(lock_file_of(table), timeout=0):  # what a run writing the table holds
        code, err = run_cli(capsys, *build_args(fasta, esm_file[0], tmp_path))
    assert_one_line_error(code, err, "build-vocab", "being written by another run", "--output-path or --species")
    assert not table.exists()


def test_what_a_killed_run_left_is_removed(tmp_path, fasta, esm_file):
    table = tmp_path / "tiny_species_gene.h5"
    killed = partial_table_of(table, 4_000_000)  # a run killed while writing: its temporary file stays
    killed.write_bytes(b"half a table")
    other = tmp_path / ".tiny_species_gene.h5.notes.partial"  # not a run's: kept
    other.write_text("a user's")
    assert main(build_args(fasta, esm_file[0], tmp_path)) == 0
    assert not killed.exists() and other.exists()
    assert read_embedding_table(table)[1].shape == (3, WIDTH)
