"""The original release's flags and config overrides keep their meaning (checked against its 0.6.1 source).

The original's cell filters (``AnnDataset``'s ``apply_filters``) are recomputed here from the counts: genes
restricted to the vocabulary's, ``filter_outliers = k`` keeps the cells whose total lies strictly within ``k``
population standard deviations of the file's mean total, then ``min_expressed_genes = m`` keeps the cells with at
least ``m`` expressed genes.
"""

import argparse
import warnings

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

from conftest import DATA_DIR
from transcriptformer.cli import build_parser, main
from transcriptformer.cli.inference import config_from_args
from transcriptformer.config import TranscriptFormerConfig
from transcriptformer.data.sources import open_counts
from transcriptformer.data.tokenize import scan_counts

MOUSE_10X = DATA_DIR / "mouse_10x_40cells.h5ad"  # 40 real mouse 10x cells, another gene set than the fixture's


def parse(reference_dir, *args: str) -> argparse.Namespace:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    base = ["--checkpoint-path", str(reference_dir), "--data-file", "x.h5ad"]
    return subparsers.choices["inference"].parse_args(base + list(args))


def run_inference(reference_dir, output, files, *args: str) -> ad.AnnData:
    """Run ``transcriptformer inference`` in-process and read its output."""
    code = main(
        ["inference", "--checkpoint-path", str(reference_dir), "--data-file", *map(str, files)]
        + ["--output-path", str(output), *args]
    )
    assert code == 0
    return ad.read_h5ad(output / "embeddings.h5ad")


@pytest.fixture(scope="module")
def embeddings(reference_model, reference_input):
    """Cell embeddings of the reference cells with the default settings, through the Python API."""
    return reference_model.embed(reference_input)


def original_filters(path, vocab, filter_outliers=0.0, min_expressed_genes=0) -> np.ndarray:
    """The cells that the original's apply_filters keeps, computed on the dense counts of the vocabulary's genes."""
    adata = ad.read_h5ad(path)
    X = adata.X.toarray()[:, vocab.lookup(adata.var["ensembl_id"].astype(str).tolist()) >= 0]
    keep = np.ones(len(X), dtype=bool)
    if filter_outliers > 0:
        totals = X.sum(axis=1)
        keep &= (totals > totals.mean() - totals.std() * filter_outliers) & (
            totals < totals.mean() + totals.std() * filter_outliers
        )
    if min_expressed_genes > 0:
        keep &= (X > 0).sum(axis=1) >= min_expressed_genes
    return keep


@pytest.mark.parametrize(("given", "expected"), [("TRUE", True), ("True", True), ("False", False), ("AUTO", None)])
def test_use_raw_takes_any_case(reference_dir, given, expected):
    assert config_from_args(parse(reference_dir, "--use-raw", given)).input.use_raw is expected
    assert parse(reference_dir, "--use-raw", given).use_raw == given.lower()


def test_use_raw_true_and_oom_dataloader_read_the_raw_counts_unchanged(
    reference_dir, reference_input, embeddings, tmp_path
):
    """``--use-raw True`` reads raw.X of a file whose X is log-normalised; ``--oom-dataloader`` changes nothing."""
    adata = ad.read_h5ad(reference_input)
    adata.raw = adata.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    normalised = tmp_path / "normalised.h5ad"
    adata.write_h5ad(normalised)
    output = run_inference(reference_dir, tmp_path / "out", [normalised], "--use-raw", "True", "--oom-dataloader")
    np.testing.assert_allclose(output.obsm["X_transcriptformer"], embeddings, rtol=1e-5, atol=1e-6)
    args = parse(reference_dir, "--oom-dataloader")
    assert args.use_oom_dataloader and config_from_args(args).input.use_oom_dataloader


def test_disable_compile_block_mask_means_attention_without_torch_compile(reference_dir, capsys):
    assert config_from_args(parse(reference_dir)).hardware.attention_backend == "auto"
    chosen = [
        config_from_args(parse(reference_dir, "--disable-compile-block-mask", *backend)).hardware.attention_backend
        for backend in ([], ["--attention-backend", "chunked"], ["--attention-backend", "dense"])
    ]
    assert chosen == ["chunked", "chunked", "dense"]
    argv = ["inference", "--checkpoint-path", str(reference_dir), "--data-file", "x.h5ad"]
    assert main([*argv, "--disable-compile-block-mask", "--attention-backend", "flex"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "drop one of the two" in error


def test_original_override_keys_are_accepted_and_typed(reference_dir):
    args = parse(
        reference_dir,
        "--config-override",
        "model.data_config.filter_outliers=2",
        "--config-override",
        "model.data_config.min_expressed_genes=10",
        "--config-override",
        "model.data_config.randomize_genes=True",
        "--config-override",
        "model.inference_config.use_oom_dataloader=true",
        "--config-override",
        "model.data_config.clip_counts=None",  # the original's parser read None as null
    )
    config = config_from_args(args)
    data = config.model.data_config
    assert (data.filter_outliers, data.min_expressed_genes, data.randomize_genes) == (2.0, 10, True)
    assert config.input.use_oom_dataloader and data.clip_counts is None
    with pytest.raises(ValueError, match="filter_outliers must be >= 0"):
        config_from_args(parse(reference_dir, "--config-override", "model.data_config.filter_outliers=-1"))


def test_a_checkpoint_does_not_set_the_run_settings(reference_dir):
    """As in the original, whose inference config reset them, config.json does not turn a filter on."""
    raw = TranscriptFormerConfig.from_json(reference_dir / "config.json").to_dict()
    raw["model"]["data_config"] |= {"filter_outliers": 2.0, "min_expressed_genes": 50, "randomize_genes": True}
    data = TranscriptFormerConfig.from_dict(raw).data_config
    assert (data.filter_outliers, data.min_expressed_genes, data.randomize_genes) == (0.0, 0, False)


def test_cell_statistics_streamed_in_blocks_are_those_of_the_whole_file(reference_model, reference_input):
    adata = ad.read_h5ad(reference_input)
    columns = np.flatnonzero(reference_model.checkpoint.gene_vocab.lookup(adata.var["ensembl_id"].tolist()) >= 0)
    with open_counts(reference_input) as reader:
        scan = scan_counts(reader, columns, block_cells=7)
    X = adata.X[:, columns].toarray()
    np.testing.assert_array_equal(scan.totals, X.sum(axis=1))
    np.testing.assert_array_equal(scan.expressed, (X > 0).sum(axis=1))


def test_filters_drop_the_cells_the_original_drops(reference_model, reference_input):
    keep = original_filters(reference_input, reference_model.checkpoint.gene_vocab, 1.5, min_expressed_genes=30)
    by_outliers = original_filters(reference_input, reference_model.checkpoint.gene_vocab, 1.5)
    assert 0 < by_outliers.sum() and keep.sum() < by_outliers.sum()  # both filters drop cells here
    with pytest.warns(UserWarning) as caught:
        cells = reference_model.tokenize(reference_input, filter_outliers=1.5, min_expressed_genes=30)
    assert list(cells.obs_names) == list(ad.read_h5ad(reference_input).obs_names[keep])
    dropped_outliers, dropped_expressed = (~by_outliers).sum(), (by_outliers & ~keep).sum()
    assert str(caught[0].message).endswith(
        f"the cell filters dropped {(~keep).sum()} of 64 cells "
        f"({dropped_outliers} by filter_outliers=1.5, {dropped_expressed} by min_expressed_genes=30)"
    )


def test_inference_filters_each_file_on_its_own_statistics_and_reports_it(
    reference_dir, reference_model, reference_input, embeddings, tmp_path, capsys
):
    vocab = reference_model.checkpoint.gene_vocab
    keep_first = original_filters(reference_input, vocab, filter_outliers=1.5)
    keep_second = original_filters(MOUSE_10X, vocab, filter_outliers=1.5)
    assert 0 < keep_first.sum() < len(keep_first) and 0 < keep_second.sum() < len(keep_second)
    output = run_inference(
        reference_dir,
        tmp_path / "out",
        [reference_input, MOUSE_10X],
        "--chunk-size",
        "16",
        "--config-override",
        "model.data_config.filter_outliers=1.5",
    )
    first, second = ad.read_h5ad(reference_input).obs_names, ad.read_h5ad(MOUSE_10X).obs_names
    assert list(output.obs_names) == [*first[keep_first], *second[keep_second]]
    n_first = int(keep_first.sum())
    np.testing.assert_allclose(
        output.obsm["X_transcriptformer"][:n_first], embeddings[keep_first], rtol=1e-5, atol=1e-6
    )
    assert list(output.uns["transcriptformer"]["cells_dropped"]) == [(~keep_first).sum(), (~keep_second).sum()]
    printed = capsys.readouterr()
    assert "inference: warning: " in printed.err and "the cell filters dropped" in printed.err
    summary = printed.out
    assert f"input.h5ad: {n_first} cells, 1024 of 1122 genes in the vocabulary; the cell filters dropped " in summary


def test_a_filter_that_drops_every_cell_is_a_one_line_error(reference_dir, reference_input, tmp_path, capsys):
    argv = ["inference", "--checkpoint-path", str(reference_dir), "--data-file", str(reference_input)]
    argv += ["--output-path", str(tmp_path), "--config-override", "model.data_config.min_expressed_genes=100000"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "dropped 64 of 64 cells" in error and "lower min_expressed_genes" in error
    assert not (tmp_path / "embeddings.h5ad").exists()


def test_randomized_gene_order_is_a_seeded_permutation_of_each_cell(reference_model, reference_input):
    adata = ad.read_h5ad(reference_input)
    in_order = reference_model.tokenize(adata)
    shuffled = reference_model.tokenize(adata, randomize_genes=True)
    seq_len = in_order.seq_len
    moved = 0
    for row in range(len(adata)):
        cols, values = in_order.sequence(row)
        random_cols, random_values = shuffled.sequence(row)
        counts = dict(zip(in_order.counts[row].indices, in_order.counts[row].data, strict=True))
        assert [counts[c] for c in random_cols] == list(random_values)  # each count stays with its gene
        if in_order.counts[row].nnz <= seq_len:
            assert sorted(random_cols) == list(cols)  # the same genes, in another order
        else:
            assert len(random_cols) == seq_len and set(random_cols) <= set(counts)  # a random seq_len of them
        moved += not np.array_equal(random_cols, cols)
    assert moved == len(adata)
    # Drawn from the cell's name: the same in another run, another batch or another order of the cells.
    again = reference_model.tokenize(adata[::-1].copy(), randomize_genes=True)
    for row in range(len(adata)):
        np.testing.assert_array_equal(again.sequence(len(adata) - 1 - row)[0], shuffled.sequence(row)[0])
    np.testing.assert_array_equal(shuffled.batch([5]).gene_tokens[0], shuffled.batch([3, 5]).gene_tokens[1])


def test_randomized_gene_order_also_moves_unexpressed_genes_without_pad_zeros(reference_model, reference_input):
    cells = reference_model.tokenize(reference_input, randomize_genes=True, pad_zeros=False)
    row = int(np.argmin(cells.counts.getnnz(axis=1)))
    cols, values = cells.sequence(row)
    expressed = cells.counts[row].nnz
    assert len(cols) == cells.seq_len and np.all(values[:expressed] > 0) and np.all(values[expressed:] == 0)
    assert not np.all(np.diff(cols[expressed:]) > 0)  # not in var order


def test_randomized_gene_order_changes_the_embeddings_reproducibly(reference_model, reference_input, embeddings):
    some = ad.read_h5ad(reference_input)[:16].copy()
    first = reference_model.embed(some, randomize_genes=True)
    second = reference_model.embed(some, randomize_genes=True)
    np.testing.assert_array_equal(first, second)
    assert (np.abs(first - embeddings[:16]).max(axis=1) > 1e-3).all()
