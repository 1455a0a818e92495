"""Genes named by the user, and the genes of a checkpoint.

The vocabulary listed (`transcriptformer genes`), one message for an unknown gene, symbols of any case under their
canonical spelling, and a file of another species named as such.
"""

import fcntl
import os
import subprocess
import sys
import warnings

import anndata as ad
import pandas as pd
import pytest

from conftest import DATA_DIR, assert_no_output
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.checkpoint import read_vocabularies, vocabulary_genes
from transcriptformer.cli import main
from transcriptformer.config import CONFIG_FILE, TranscriptFormerConfig
from transcriptformer.data.gene_symbols import id_species, species_mismatch, symbols_by_id
from transcriptformer.data.tokenize import select_genes
from transcriptformer.perturbation.specs import parse_perturbations

DEMO = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"
HELDOUT = DATA_DIR / "demo_mouse_brain_heldout.h5ad"
HUMAN = DATA_DIR / "pbmc_40cells.h5ad"
SOX10 = "ENSMUSG00000033006"


@pytest.fixture(scope="module")
def vocab():
    return read_vocabularies(DEMO, TranscriptFormerConfig.from_json(DEMO / CONFIG_FILE))[0]


def test_the_genes_command_lists_the_vocabulary(vocab, capsys):
    table = vocabulary_genes(DEMO)
    assert list(table["gene_id"]) == vocab.gene_ids and set(table["species"]) == {"mus_musculus"}
    assert table.set_index("gene_id").loc[SOX10, "symbol"] == "Sox10" == symbols_by_id()[SOX10]
    assert main(["genes", "--checkpoint-path", str(DEMO), "--search", "SOX1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["gene_id", "symbol", "species"]
    assert sorted(line.split()[1] for line in lines[1:]) == ["Sox1", "Sox10"]
    assert main(["genes", "--checkpoint-path", str(DEMO), "--species"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["mus_musculus", str(len(vocab.gene_ids))]
    assert main(["genes", "--checkpoint-path", str(DEMO), "--search", "no-such-gene"]) == 0
    assert capsys.readouterr().out.strip() == "no gene of the vocabulary matches 'no-such-gene'"


def test_a_reader_that_stops_early_ends_the_listing_quietly():
    """``transcriptformer genes | head -1``: the process ends as Unix tools do (SIGPIPE's status), no error line."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # smaller than the listing: the writer waits for the reader
    command = [sys.executable, "-m", "transcriptformer", "genes", "--checkpoint-path", str(DEMO)]
    with subprocess.Popen(command, stdout=write_end, stderr=subprocess.PIPE, text=True) as process:
        os.close(write_end)
        with os.fdopen(read_end) as listing:
            assert listing.readline().split() == ["gene_id", "symbol", "species"]  # then closed, as head does
        err = process.stderr.read()
    assert process.returncode == 141 and err == ""


def test_symbols_of_any_case_are_named_as_the_tables_write_them(vocab):
    perturbations = parse_perturbations(["sox10", "SOX10+pou3f3"], ["sox10=20"], vocab)
    assert [p.name for p in perturbations] == ["ko:Sox10", "ko:Sox10+Pou3f3", "oe:Sox10=20"]
    assert perturbations[0].gene_ids == (SOX10,)


@pytest.mark.parametrize(
    ("gene", "where"),
    [
        ("Gfap", "is in the input file but not in the checkpoint's vocabulary"),  # in var, not in the demo model
        ("aqp4", "is in the input file but not in the checkpoint's vocabulary"),  # the same, in lower case
        ("Pou3f", "is neither in the checkpoint's vocabulary nor in the input file"),
    ],
)
def test_an_unknown_gene_says_whether_the_input_has_it(tmp_path, capsys, gene, where):
    output = tmp_path / "out"
    args = ["perturb", "--checkpoint-path", DEMO, "--data-file", HELDOUT, "--output-path", output]
    code, err = run_cli(capsys, *args, "--knock-out", gene)
    assert_one_line_error(code, err, "perturb", f"--knock-out {gene!r}: {gene!r} {where}", "close matches in the")
    assert "`transcriptformer genes` lists the vocabulary" in err
    assert_no_output(output)


def test_the_perturbation_is_labelled_with_the_canonical_symbol(tmp_path):
    output = tmp_path / "out"
    args = ["perturb", "--checkpoint-path", DEMO, "--data-file", HELDOUT, "--output-path", output]
    assert main([*map(str, args), "--knock-out", "sox10", "--obs-filter", "cell_type == 'astrocyte'", "-q"]) == 0
    cells = ad.read_h5ad(output / "perturbations.h5ad")
    assert list(cells.obs["perturbation"].cat.categories) == ["ko:Sox10"]


def test_a_file_of_another_species_is_named(tmp_path, capsys, vocab):
    human = ad.read_h5ad(HUMAN, backed="r").var
    assert id_species(human["ensembl_id"].dropna()) == "human" and id_species(vocab.gene_ids) == "mouse"
    # a vocabulary of several species (TF-Metazoa's) that holds the data's species is no mismatch
    assert species_mismatch(human["ensembl_id"].dropna(), [*vocab.gene_ids, *human["ensembl_id"].dropna()[:5]]) is None
    code, err = run_cli(
        capsys, "inference", "--checkpoint-path", DEMO, "--data-file", HUMAN, "--output-path", tmp_path / "out"
    )
    mismatch = "the data's gene ids look human and the checkpoint's vocabulary is mouse"
    assert_one_line_error(code, err, "inference", "none of the 2000 genes", mismatch, "tf-sapiens")
    # A few genes of the vocabulary among many of another species: the run goes on, with a warning.
    mixed = pd.concat([human, ad.read_h5ad(HELDOUT, backed="r").var.iloc[:50]])
    with pytest.warns(UserWarning, match=f"only [0-9]+ of the {len(mixed)} genes .* {mismatch}"):
        selected = select_genes(mixed, vocab, "ensembl_id")
    assert 0 < len(selected.columns) <= 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the mouse file alone: no warning
        select_genes(ad.read_h5ad(HELDOUT, backed="r").var, vocab, "ensembl_id")
