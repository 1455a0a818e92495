"""Genome-wide screens (``transcriptformer screen``) with the demo model on real held-out mouse brain cells.

Prefix reuse equals the straightforward path on real cells, cut ones included; the command writes its pairs and
ranked genes with p-values and FDR; bad input stops before any work with a one-line error.
"""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.stats
import torch

import transcriptformer
from conftest import DATA_DIR, assert_no_output
from test_inference_resume import kill_after_some_units
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.cli import main
from transcriptformer.config import PredictConfig
from transcriptformer.perturbation.screen import (
    ScreenRun,
    check_disk_space,
    gene_statistics,
    merge_pair_files,
    pair_writer,
    planned_pairs,
    screen_cells,
)

DEMO = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"
HELDOUT = DATA_DIR / "demo_mouse_brain_heldout.h5ad"
EFFECTS = ["cosine_shift", "delta_log_likelihood", "delta_mean_log_likelihood"]


def screen_of(model, cells, prefix_reuse: bool, kind="knock_out", cap=10) -> pd.DataFrame:
    vocab_size = len(model.checkpoint.gene_vocab)
    run = ScreenRun(
        model.model, PredictConfig(batch_size=8), torch.device("cpu"), prefix_reuse, np.full(vocab_size, -1)
    )
    return screen_cells(run, cells, kind, None, cap)


@pytest.mark.slow  # the full path on every variant: about 20 s a kind on two busy cores
@pytest.mark.parametrize("kind", ["knock_out", "over_express"])
def test_prefix_reuse_equals_the_straightforward_path_on_real_cells_cut_ones_included(kind):
    model = transcriptformer.load(DEMO, device="cpu")
    cells = model.tokenize(ad.read_h5ad(HELDOUT)[:4].copy())
    length = int(np.median(cells.n_tokens()))
    cut = dataclasses.replace(cells, seq_len=length)  # about half the cells are cut: a knock-out lets the next gene in
    expressed = np.diff(cut.counts.indptr)
    assert (expressed > length).any() and (expressed < length).any()
    fast, full = screen_of(model, cut, True, kind), screen_of(model, cut, False, kind)
    pd.testing.assert_frame_equal(
        fast[["cell", "gene_id", "count", "count_rank"]], full[["cell", "gene_id", "count", "count_rank"]]
    )
    assert len(full) > 25
    for key in EFFECTS:
        scale = full[key].abs().max()
        np.testing.assert_allclose(fast[key], full[key], rtol=1e-5, atol=1e-5 * scale, err_msg=key)


def test_a_screen_writes_its_pairs_and_ranked_genes(tmp_path, capsys):
    output = tmp_path / "out"
    args = ["screen", "--checkpoint-path", DEMO, "--data-file", HELDOUT, "--output-path", output, "--knock-out", "all"]
    flags = ["--obs-filter", "cell_type == 'astrocyte'", "--max-genes-per-cell", "6", "--null-bins", "2"]
    assert main([str(a) for a in [*args, *flags]]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"Output: {(output / 'screen.h5ad').resolve()}"
    cells = ad.read_h5ad(HELDOUT)
    astrocytes = cells[cells.obs["cell_type"] == "astrocyte"]
    pairs = pd.read_parquet(output / "screen_pairs.parquet")
    stored = ad.read_h5ad(output / "screen.h5ad")  # a row per screened cell, its pairs
    assert list(stored.obs_names) == list(astrocytes.obs_names) and set(pairs["cell"]) == set(astrocytes.obs_names)
    assert (stored.obs["n_pairs"] == pairs["cell"].value_counts()[stored.obs_names]).all()
    assert stored.uns["screen"]["n_pairs"] == len(pairs)
    assert (stored.obs["cell_type"] == "astrocyte").all()  # each screened cell's row carries its obs columns
    np.testing.assert_array_equal(stored.obs["assay"], cells.obs.loc[stored.obs_names, "assay"])
    assert pairs.groupby("cell").size().max() <= 6 and pairs["count_rank"].max() <= 6
    tokenized = transcriptformer.load(DEMO, device="cpu").tokenize(astrocytes)
    counts = pd.DataFrame(tokenized.counts.toarray(), index=tokenized.obs_names, columns=tokenized.gene_ids)
    for _, pair in pairs.sample(10, random_state=0).iterrows():  # each gene is expressed in its cell
        assert counts.loc[pair["cell"], pair["gene_id"]] == pair["count"] > 0
    genes = pd.read_csv(output / "screen_genes.csv")
    assert list(genes["rank"]) == list(range(1, len(genes) + 1)) and set(genes["gene_id"]) == set(pairs["gene_id"])
    tested = genes.dropna(subset=["p_value"])
    assert (tested["n_cells"] >= 3).all() and ((tested["fdr"] >= tested["p_value"]) & (tested["fdr"] <= 1)).all()
    assert (np.diff(tested["p_value"]) >= 0).all()
    means = pairs.groupby("gene_id")["cosine_shift"].mean()
    np.testing.assert_allclose(genes.set_index("gene_id")["mean_cosine_shift"], means[genes["gene_id"]])
    for gene in tested["gene_id"].iloc[[0, -1]]:  # the first and last ranked: p-values recomputed pair by pair
        assert tested.set_index("gene_id").loc[gene, "p_value"] == pytest.approx(null_p_value(pairs, gene, 2))


@pytest.fixture(scope="module")
def screened_pairs() -> pd.DataFrame:
    """The knock-out pairs of 30 held-out cells, 20 genes a cell at most."""
    model = transcriptformer.load(DEMO, device="cpu")
    return screen_of(model, model.tokenize(ad.read_h5ad(HELDOUT)[:30].copy()), True, cap=20)


def test_gene_statistics_read_a_row_group_at_a_time_equal_those_of_all_pairs_at_once(tmp_path, screened_pairs):
    pairs = screened_pairs
    files = [tmp_path / "pairs-0.parquet", tmp_path / "pairs-1.parquet"]
    for file, cells in zip(files, np.array_split(pairs["cell"].unique(), 2), strict=True):  # as two units
        with pair_writer(file, with_goal=False) as write:
            for group in np.array_split(cells, 3):  # a cell's pairs in one row group, as groups of cells
                write(pairs[pairs["cell"].isin(group)])
    assert [pq.ParquetFile(file).num_row_groups for file in files] == [3, 3]
    merged = tmp_path / "merged.parquet"
    assert merge_pair_files(files, merged, with_goal=False) == len(pairs)
    pd.testing.assert_frame_equal(
        pd.read_parquet(merged).set_index(["cell", "gene_id"]).sort_index(),
        pairs.set_index(["cell", "gene_id"]).sort_index(),
    )
    for n_bins in (1, 3, 10):
        streamed, whole = gene_statistics(files, "cosine_shift", n_bins), gene_statistics(pairs, "cosine_shift", n_bins)
        pd.testing.assert_frame_equal(streamed, whole, rtol=1e-12)
        expected = gene_statistics_at_once(pairs, n_bins)  # pandas' qcut and groupby over all pairs
        pd.testing.assert_frame_equal(streamed, expected, rtol=1e-9, check_dtype=False, check_names=False)
        assert streamed["p_value"].notna().sum() > 10


def test_the_planned_pairs_bound_the_pairs_of_each_cell(screened_pairs):
    model = transcriptformer.load(DEMO, device="cpu")
    cells = model.tokenize(ad.read_h5ad(HELDOUT)[:30].copy())
    expressed = np.diff(cells.counts.indptr)
    planned = pd.Series(planned_pairs(expressed, "knock_out", None, 20, cells.seq_len), index=cells.obs_names)
    done = screened_pairs["cell"].value_counts().reindex(planned.index, fill_value=0)
    assert (done <= planned).all() and (done == planned).mean() > 0.9  # a variant that changes nothing has no row
    assert (planned_pairs(expressed, "knock_out", None, 0, 50) == np.minimum(expressed, 50)).all()  # cut at seq_len
    assert (planned_pairs(expressed, "over_express", 7, 0, 50) == 7).all()  # genes a cell lacks are screened too


def test_a_screen_larger_than_the_free_disk_space_is_refused_before_any_work(tmp_path):
    check_disk_space(tmp_path, 1000)  # 128 kB
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(
        ValueError, match=r"plans up to [\d,]+ \(cell, gene\) pairs, about .* GiB of files, and .* free"
    ):
        check_disk_space(tmp_path, free // 64)


def gene_statistics_at_once(pairs: pd.DataFrame, n_bins: int) -> pd.DataFrame:
    """The gene table of :func:`gene_statistics`, computed from every pair in memory with pandas alone."""
    bins = pd.qcut(np.log1p(pairs["count"]), n_bins, labels=False, duplicates="drop")
    groups = pairs.groupby([pairs["cell"], bins], sort=False)["cosine_shift"]
    size, total, sd = groups.transform("size"), groups.transform("sum"), groups.transform("std")
    residual = ((pairs["cosine_shift"] - (total - pairs["cosine_shift"]) / (size - 1)) / sd).where(
        (size >= 3) & (sd > 0)
    )
    grouped = pairs.assign(residual=residual).groupby("gene_id", sort=False)
    table = grouped[EFFECTS].mean().add_prefix("mean_")
    table.insert(0, "n_cells", grouped.size())
    n, mean, sd = grouped["residual"].count(), grouped["residual"].mean(), grouped["residual"].std()
    table["mean_residual"], table["t"] = mean, mean / (sd / np.sqrt(n))
    table["p_value"] = pd.Series(scipy.stats.t.sf(table["t"], n - 1), index=n.index).where(n >= 3)
    valid = table["p_value"].notna()
    table["fdr"] = np.nan
    table.loc[valid, "fdr"] = scipy.stats.false_discovery_control(table.loc[valid, "p_value"].to_numpy())
    table = table.sort_values(["p_value", "mean_residual"], ascending=[True, False], na_position="last", kind="stable")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def null_p_value(pairs: pd.DataFrame, gene: str, n_bins: int) -> float:
    """The one-sided p-value of ``gene``'s cosine shifts against the other genes of its cells and count bin."""
    bins = pd.qcut(np.log1p(pairs["count"]), n_bins, labels=False, duplicates="drop")
    residuals = []
    for index, pair in pairs[pairs["gene_id"] == gene].iterrows():
        group = pairs[(pairs["cell"] == pair["cell"]) & (bins == bins[index])]["cosine_shift"]
        if len(group) >= 3:
            others = group.drop(index)
            residuals.append((pair["cosine_shift"] - others.mean()) / group.std())
    return scipy.stats.ttest_1samp(residuals, 0, alternative="greater").pvalue


def test_a_goal_state_screen_ranks_by_the_shift_toward_the_goal(tmp_path):
    output = tmp_path / "out"
    args = ["screen", "--checkpoint-path", str(DEMO), "--data-file", str(HELDOUT), "--output-path", str(output)]
    states = ["--start-state", "cell_type=oligodendrocyte", "--goal-state", "cell_type=astrocyte"]
    assert main([*args, "--knock-out", "all", "--max-genes-per-cell", "4", *states]) == 0
    pairs = pd.read_parquet(output / "screen_pairs.parquet")
    cells = ad.read_h5ad(HELDOUT)
    assert set(pairs["cell"]) == set(cells.obs_names[cells.obs["cell_type"] == "oligodendrocyte"])
    assert np.isfinite(pairs["goal_shift"]).all() and (pairs["goal_shift"] != 0).any()
    genes = pd.read_csv(output / "screen_genes.csv")
    assert "mean_goal_shift" in genes.columns


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--obs-filter", "cell_type == 'neuron of the moon'"], ["selects no cells", "--obs-filter"]),
        (["--obs-filter", "no_column == 1"], ["not a valid filter on obs", "cell_type"]),
        (["--start-state", "cell_type=astrocyte", "--goal-state", "cell_type=moon"], ["--goal-state", "holds no cell"]),
        (["--start-state", "cell_type=astrocyte"], ["--start-state and --goal-state go together"]),
        (["--genes-file", "GENES_UNKNOWN"], ["--genes-file", "none of its 2 genes"]),
    ],
    ids=["empty-selection", "bad-filter", "goal-without-cells", "start-alone", "no-known-gene"],
)
def test_bad_input_is_a_one_line_error_before_any_work(tmp_path, capsys, flags, words):
    (tmp_path / "GENES_UNKNOWN").write_text("NotAGene1\nNotAGene2\n")
    flags = [str(tmp_path / f) if f == "GENES_UNKNOWN" else f for f in flags]
    output = tmp_path / "out"
    args = ["screen", "--checkpoint-path", DEMO, "--data-file", HELDOUT, "--output-path", output, "--knock-out", "all"]
    code, err = run_cli(capsys, *args, *flags)
    assert_one_line_error(code, err, "screen", *words)
    assert_no_output(output)


def test_unknown_genes_of_a_genes_file_are_named_and_skipped(tmp_path, capsys):
    genes_file = tmp_path / "genes.txt"
    genes_file.write_text("Gja1\nNotAGene\nAcsbg1\nGfap\n")
    output = tmp_path / "out"
    args = ["screen", "--checkpoint-path", DEMO, "--data-file", HELDOUT, "--output-path", output, "--knock-out", "all"]
    code, err = run_cli(capsys, *args, "--genes-file", genes_file, "--obs-filter", "cell_type == 'astrocyte'")
    assert code == 0, err
    skipped = "2 unknown gene(s) skipped: 1 in the input file but not in the vocabulary (Gfap); 1 not in the vocabulary"
    assert "warning: --genes-file" in err and f"{skipped} (NotAGene)" in err
    pairs = pd.read_parquet(output / "screen_pairs.parquet")
    assert set(pairs["gene_id"]) <= {"ENSMUSG00000050953", "ENSMUSG00000032281"}


@pytest.mark.slow  # two fresh processes and a run in this one (about 40 s on two busy cores)
def test_a_killed_screen_resumes_to_the_uninterrupted_result(tmp_path):
    flags = ["--knock-out", "all", "--obs-filter", "cell_type == 'astrocyte'", "--max-genes-per-cell", "20"]
    flags += ["--chunk-size", "2", "--device", "cpu"]

    def args(output):
        return ["screen", "--checkpoint-path", str(DEMO), "--data-file", str(HELDOUT), "--output-path", str(output)]

    assert main([*args(tmp_path / "whole"), *flags]) == 0
    command = [sys.executable, "-m", "transcriptformer", *args(tmp_path / "resumed"), *flags]
    parts = tmp_path / "resumed" / ".screen.h5ad.parts"
    kill_after_some_units(command, parts, units=2)
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "units were already done" in resumed.stdout
    for name in ("screen_pairs.parquet", "screen_genes.parquet"):
        whole, again = (pd.read_parquet(tmp_path / run / name) for run in ("whole", "resumed"))
        pd.testing.assert_frame_equal(again, whole)


@pytest.mark.slow  # three fresh processes (about 40 s on two busy cores)
def test_two_processes_write_the_single_process_screen(tmp_path):
    flags = ["--knock-out", "all", "--obs-filter", "cell_type == 'astrocyte'", "--max-genes-per-cell", "8"]
    flags += ["--chunk-size", "3", "--device", "cpu", "--checkpoint-path", str(DEMO), "--data-file", str(HELDOUT)]
    assert main(["screen", *flags, "--output-path", str(tmp_path / "one")]) == 0
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    command = [str(Path(sys.executable).parent / "transcriptformer"), "screen", *flags, "--num-gpus", "2"]
    done = subprocess.run([*command, "--output-path", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "(2 processes" in done.stdout
    for name in ("screen_pairs.parquet", "screen_genes.parquet"):
        one, two = (pd.read_parquet(tmp_path / run / name) for run in ("one", "two"))
        pd.testing.assert_frame_equal(two, one)
