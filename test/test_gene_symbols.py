import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from transcriptformer.config import DataConfig
from transcriptformer.data.gene_symbols import (
    load_symbol_table,
    looks_like_ensembl_id,
    map_symbols_to_ensembl,
    symbol_index,
)
from transcriptformer.data.tokenize import CellTokenizer, gene_ids_from_var
from transcriptformer.data.vocab import GeneVocab, build_gene_vocab

DATA = Path(__file__).parent / "data"
MOUSE = DATA / "reference_tiny" / "input.h5ad"  # 64 mouse cells: var 'gene_name' (symbols) and 'ensembl_id'
HUMAN = DATA / "human_symbols_16cells.h5ad"  # 16 human 10x cells: var 'gene_symbol' and 'ensembl_id' (NaN gaps)
SPECIAL = ["unknown", "[PAD]", "[START]", "[END]", "[RD]", "[CELL]", "[MASK]"]


def as_ids(values) -> pd.Series:
    return pd.Series(list(values), dtype="object")


def test_ensembl_id_pattern():
    assert looks_like_ensembl_id("ENSG00000141510")
    assert looks_like_ensembl_id("ENSMUSG00000059552.3")
    assert looks_like_ensembl_id("ENSDARG00000012345")
    assert not looks_like_ensembl_id("TP53")
    assert not looks_like_ensembl_id("ENSG0000014151")  # too short
    assert not looks_like_ensembl_id("FBgn0000003")


def test_bundled_tables_are_symbol_to_id_pairs():
    for species, prefix in [("homo_sapiens", "ENSG"), ("mus_musculus", "ENSMUSG")]:
        table = load_symbol_table(species)
        assert list(table.columns) == ["ensembl_id", "symbol"]
        assert len(table) > 40_000
        assert table["ensembl_id"].str.startswith(prefix).all()
        assert not table["ensembl_id"].duplicated().any()
        assert not (table["symbol"] == table["ensembl_id"]).any()


def test_mouse_symbols_map_to_the_ids_the_data_carries():
    var = ad.read_h5ad(MOUSE).var
    mapped, report = map_symbols_to_ensembl(as_ids(var["gene_name"]))
    assert report.species == "mus_musculus"
    assert report.n_candidates == len(var)
    assert report.n_mapped / len(var) > 0.95
    known = var["gene_name"].isin(symbol_index("mus_musculus")[0].keys()).to_numpy()
    assert report.n_mapped == known.sum()
    # Every mapped symbol gives the id the dataset itself lists; unknown (retired) symbols have no id.
    np.testing.assert_array_equal(mapped[known].to_numpy(), var["ensembl_id"].to_numpy()[known])
    assert mapped[~known].isna().all() and (~known).sum() > 0
    assert set(report.unmapped_examples) <= set(var["gene_name"][~known])


def test_human_symbols_agree_with_the_published_ids():
    var = ad.read_h5ad(HUMAN).var
    mapped, report = map_symbols_to_ensembl(as_ids(var["gene_symbol"]))
    assert report.species == "homo_sapiens"
    published = var["ensembl_id"].notna().to_numpy()
    np.testing.assert_array_equal(mapped[published].to_numpy(), var["ensembl_id"].to_numpy()[published])
    # Old clone-based names (e.g. RP11-...) are not in the current reference and stay unmapped.
    assert report.n_mapped >= published.sum()
    assert report.n_mapped < report.n_candidates


def test_mixed_column_keeps_ids_and_maps_symbols():
    ids = as_ids(["ENSG00000141510.4", "CD4", None, "TP53", "not-a-gene", "ENSG00000010610"])
    mapped, report = map_symbols_to_ensembl(ids)
    table = symbol_index("homo_sapiens")[0]
    assert mapped.tolist() == ["ENSG00000141510.4", table["CD4"], None, table["TP53"], None, "ENSG00000010610"]
    assert (report.species, report.n_candidates, report.n_mapped) == ("homo_sapiens", 3, 2)
    assert report.unmapped_examples == ("not-a-gene",)


def test_ids_of_other_species_are_left_alone():
    fly = [f"FBgn{i:07d}" for i in range(200)]
    # One value that happens to be a human symbol does not make this a symbol column.
    ids = as_ids([*fly, "CD4"])
    mapped, report = map_symbols_to_ensembl(ids)
    assert mapped.tolist() == ids.tolist()
    assert report.species is None and report.n_mapped == 0


def test_ambiguous_symbol_takes_the_first_listed_gene():
    table = load_symbol_table("homo_sapiens")
    counts = table["symbol"].value_counts()
    symbol = counts.index[counts > 1][0]
    mapped, report = map_symbols_to_ensembl(as_ids([symbol]), species="homo_sapiens")
    assert mapped[0] == table.loc[table["symbol"] == symbol, "ensembl_id"].iloc[0]
    assert report.n_ambiguous == 1


def test_unknown_species_is_an_error():
    with pytest.raises(ValueError, match="no gene symbol table for 'danio_rerio'"):
        load_symbol_table("danio_rerio")


def test_gene_ids_from_var_reports_the_mapping(caplog):
    var = ad.read_h5ad(HUMAN).var
    with pytest.warns(UserWarning, match=r"mapped [\d,]+ of 9,753 gene symbols in var\['gene_symbol'\]"):
        gene_ids_from_var(var, "gene_symbol")
    complete = pd.DataFrame({"gene_symbol": ["CD4", "TP53"]}, index=["a", "b"])
    with caplog.at_level(logging.INFO, logger="transcriptformer.data.gene_symbols"):
        ids = gene_ids_from_var(complete, "gene_symbol")
    assert ids.str.startswith("ENSG").all()
    assert "mapped 2 of 2 gene symbols in var['gene_symbol']" in caplog.text


def test_tokenizing_by_symbol_matches_tokenizing_by_id():
    vocab = build_gene_vocab(SPECIAL, [DATA / "reference_tiny" / "vocabs" / "mus_musculus_gene.h5"])
    adata = ad.read_h5ad(MOUSE)
    with pytest.warns(UserWarning, match="gene symbols in var\\['gene_name'\\]"):
        by_symbol = CellTokenizer(vocab, {}, DataConfig(gene_col_name="gene_name"), seq_len=127).tokenize(adata)
    # The same cells with the ids of the unmappable symbols removed must tokenize identically.
    unknown = ~adata.var["gene_name"].isin(symbol_index("mus_musculus")[0].keys())
    by_id_data = adata.copy()
    by_id_data.var["ensembl_id"] = by_id_data.var["ensembl_id"].astype(object).where(~unknown, None)
    by_id = CellTokenizer(vocab, {}, DataConfig(gene_col_name="ensembl_id"), seq_len=127).tokenize(by_id_data)
    np.testing.assert_array_equal(by_symbol.gene_ids, by_id.gene_ids)
    rows = np.arange(len(adata))
    a, b = by_symbol.batch(rows), by_id.batch(rows)
    assert (a.gene_tokens == b.gene_tokens).all() and (a.gene_counts == b.gene_counts).all()
    assert (a.gene_tokens != vocab.special("[PAD]")).sum() > 1000


def test_human_cells_tokenize_from_symbols():
    adata = ad.read_h5ad(HUMAN)
    mapped, _ = map_symbols_to_ensembl(as_ids(adata.var["gene_symbol"]))
    vocab = GeneVocab.build(SPECIAL, mapped.dropna())
    with pytest.warns(UserWarning, match="gene symbols"):
        cells = CellTokenizer(vocab, {}, DataConfig(gene_col_name="gene_symbol"), seq_len=2047).tokenize(adata)
    assert len(cells.gene_ids) == len(vocab) - len(SPECIAL)
    assert all(looks_like_ensembl_id(g) for g in cells.gene_ids)
    batch = cells.batch(np.arange(len(adata)))
    expressed = (batch.gene_counts > 0).sum(1)
    assert expressed.min() > 100
