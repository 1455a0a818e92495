"""Gene-embedding swaps for out-of-distribution species (SPEC section 7), on real mouse and human cells."""

import anndata as ad
import numpy as np
import pytest
import torch

import transcriptformer
from conftest import DATA_DIR
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.cli import main
from transcriptformer.data.vocab import write_embedding_table

OUTPUTS = ("embeddings", "llh", "gene_llh", "mu", "cge")
HUMAN_PBMC = DATA_DIR / "pbmc_40cells.h5ad"


def write_table(path, gene_ids, rows):
    """A gene-embedding file in the published layout: dataset ``keys``, group ``arrays``."""
    write_embedding_table(path, dict(zip(gene_ids, rows, strict=True)))
    return path


def swapped(reference_dir, *tables):
    checkpoint = load_checkpoint(reference_dir).with_gene_embeddings(tables)
    return transcriptformer.TranscriptFormerModel(checkpoint, torch.device("cpu"))


def own_table(model):
    """The model's gene ids and their rows of its frozen table."""
    vocab = model.checkpoint.gene_vocab
    table = model.model.gene_embeddings.embedding.weight.numpy()
    return vocab.gene_ids, table[vocab.lookup(vocab.gene_ids)]


@pytest.fixture(scope="module")
def human_genes():
    """Ensembl ids of the 300 most often detected genes of the PBMC file."""
    pbmc = ad.read_h5ad(HUMAN_PBMC)
    detected = np.asarray((pbmc.X > 0).sum(0)).ravel()
    ids = pbmc.var["ensembl_id"].to_numpy()[np.argsort(-detected, kind="stable")]
    return [g for g in ids if isinstance(g, str)][:300]


def test_identical_table_reproduces_the_models_outputs_exactly(
    tmp_path, reference_dir, reference_model, reference_input
):
    genes, rows = own_table(reference_model)
    model = swapped(reference_dir, write_table(tmp_path / "own.h5", genes, rows))
    assert model.checkpoint.gene_vocab.index == reference_model.checkpoint.gene_vocab.index
    before = reference_model.predict(reference_input, output_keys=OUTPUTS)
    after = model.predict(reference_input, output_keys=OUTPUTS)
    for key in OUTPUTS:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_genes_are_matched_by_id_not_by_position(
    tmp_path, reference_dir, reference_model, reference_input, human_genes
):
    """Mouse genes in another order, after human genes, in two files: the mouse cells' outputs do not change."""
    genes, rows = own_table(reference_model)
    order = np.random.default_rng(0).permutation(len(genes))
    human = write_table(tmp_path / "human.h5", human_genes, np.random.default_rng(1).normal(size=(300, rows.shape[1])))
    mouse = write_table(tmp_path / "mouse.h5", [genes[i] for i in order], rows[order])
    model = swapped(reference_dir, human, mouse)
    vocab = model.checkpoint.gene_vocab
    assert vocab[genes[order[0]]] == 7 + 300  # the second file's genes follow the first file's
    before = reference_model.predict(reference_input, output_keys=OUTPUTS)
    after = model.predict(reference_input, output_keys=OUTPUTS)
    for key in ("embeddings", "llh", "mu", "gene_llh"):
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_new_species_special_tokens_padding_and_heads(tmp_path, reference_dir, reference_model, human_genes):
    width = reference_model.model.gene_embeddings.embedding.weight.shape[1]
    table = np.random.default_rng(0).normal(size=(len(human_genes), width)).astype(np.float32)
    model = swapped(reference_dir, write_table(tmp_path / "human.h5", human_genes, table))
    vocab, old_vocab = model.checkpoint.gene_vocab, reference_model.checkpoint.gene_vocab
    network, old_network = model.model, reference_model.model

    # special tokens keep their indices and rows; the new genes follow them
    assert len(vocab) == 7 + 300 and vocab.special_tokens == old_vocab.special_tokens
    for token in vocab.special_tokens:
        assert vocab[token] == old_vocab[token]
    assert network.special_tokens == old_network.special_tokens
    new_table = network.gene_embeddings.embedding.weight
    torch.testing.assert_close(new_table[:7], old_network.gene_embeddings.embedding.weight[:7], rtol=0, atol=0)
    np.testing.assert_array_equal(new_table[vocab[human_genes[5]]].numpy(), table[5])

    # count head: specials keep their bias, new genes get the mean bias of the old genes; no out-of-range row
    bias, old_bias = network.mu.gene_embedding.weight.detach(), old_network.mu.gene_embedding.weight.detach()
    assert bias.shape == (len(vocab), 1)
    torch.testing.assert_close(bias[:7], old_bias[:7], rtol=0, atol=0)
    torch.testing.assert_close(bias[7:], old_bias[7:].mean().expand(300, 1))
    # gene-id head: its classes are unchanged; new genes have none
    assert network.gene_head_classes.tolist() == list(range(7)) + [-1] * 300

    result = model.predict(HUMAN_PBMC, output_keys=OUTPUTS)
    tokens = result["gene_token_indices"]
    genes = tokens != vocab["[PAD]"]
    assert genes.sum(1).min() > 0 and tokens.max() < len(vocab)
    assert np.isfinite(result["embeddings"]).all() and np.isfinite(result["llh"]).all()
    # padding stays masked: mu is 0 there and sums to each cell's total count over its genes
    assert (result["mu"][~genes] == 0).all()
    np.testing.assert_allclose(result["mu"].sum(1), result["gene_counts"].sum(1), rtol=1e-5)
    # a new gene has no gene-id score; [END] (a class of the head) keeps one
    last = tokens.shape[1] - 1
    assert np.isnan(result["gene_llh"][:, :last][genes[:, :last]]).all()
    full = genes[:, last]
    assert np.isfinite(result["gene_llh"][full, last]).all()


def test_a_second_swap_is_refused(tmp_path, reference_dir, reference_model):
    genes, rows = own_table(reference_model)
    table = write_table(tmp_path / "own.h5", genes, rows)
    checkpoint = load_checkpoint(reference_dir).with_gene_embeddings([table])
    with pytest.raises(ValueError, match="swapped already"):
        checkpoint.with_gene_embeddings([table])


def test_bad_tables_are_clear_errors(tmp_path, reference_dir, human_genes):
    narrow = write_table(tmp_path / "narrow.h5", human_genes[:3], np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match="gene embeddings are 8 wide, the model's are 32"):
        load_checkpoint(reference_dir).with_gene_embeddings([narrow])
    empty = write_table(tmp_path / "empty.h5", [], [])
    with pytest.raises(ValueError, match="hold no gene"):
        load_checkpoint(reference_dir).with_gene_embeddings([empty])


def test_cli_runs_human_cells_on_the_mouse_model(tmp_path, reference_dir, human_genes, capsys):
    table = np.random.default_rng(0).normal(size=(len(human_genes), 32)).astype(np.float32)
    human = write_table(tmp_path / "human.h5", human_genes, table)
    output = tmp_path / "out"
    args = ["inference", "--checkpoint-path", str(reference_dir), "--data-file", str(HUMAN_PBMC)]
    args += ["--pretrained-embedding", str(human), "--output-path", str(output), "--output-keys"]
    code = main([*args, "embeddings", "llh", "gene_llh", "mu"])
    assert code == 0, capsys.readouterr().err
    assert "40 cells, 300 of 2000 genes in the vocabulary" in capsys.readouterr().out
    adata = ad.read_h5ad(output / "embeddings.h5ad")
    assert set(adata.var_names) <= set(human_genes)
    assert adata.obsm["X_transcriptformer"].shape == (40, 64) and np.isfinite(adata.obs["llh"]).all()
    assert np.isnan(adata.layers["gene_llh"].data).all()  # no gene of this table has a gene-id class
    assert np.isfinite(adata.layers["mu"].data).all() and adata.layers["mu"].nnz > 0
    assert list(adata.uns["transcriptformer"]["pretrained_embedding"]) == [str(human)]
