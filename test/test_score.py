"""The generative scores: definitions, parity with the original, behaviour on real and corrupted cells, QC flags.

Real cells throughout: the bundled demo model (``models/demo-mouse-brain``) with the held-out mouse brain cells it
was not trained on, and the reference checkpoint with the original implementation's outputs (``expected.npz``).
"""

import json
from dataclasses import asdict
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import norm

import transcriptformer
from conftest import DATA_DIR, assert_no_output
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.cli import build_parser, main
from transcriptformer.cli.common import run_config_from_args
from transcriptformer.engine.parts import open_parts_dir, part_file
from transcriptformer.engine.session import prepare
from transcriptformer.model.likelihood import gene_cross_entropy, zero_truncated_poisson_nll
from transcriptformer.model.outputs import SCORE_KEYS, end_target_position
from transcriptformer.tasks.score import CELL_SCORE_KEYS, QC_KEY, ScoreConfig, ScoreTask, flag_outliers

DEMO_MODEL = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"
HELDOUT = DATA_DIR / "demo_mouse_brain_heldout.h5ad"
QC_COLUMNS = ["mean_log_likelihood_robust_z", "likelihood_outlier"]


@pytest.fixture(scope="module")
def demo_model() -> transcriptformer.TranscriptFormerModel:
    return transcriptformer.load(DEMO_MODEL, device="cpu")


@pytest.fixture(scope="module")
def heldout(demo_model) -> ad.AnnData:
    """The held-out cells, on the genes of the model's vocabulary (so that moving counts between genes keeps them)."""
    cells = ad.read_h5ad(HELDOUT)
    in_vocab = demo_model.checkpoint.gene_vocab.lookup(list(cells.var["ensembl_id"])) >= 0
    cells = cells[:, in_vocab].copy()
    cells.X = sp.csr_matrix(cells.X, dtype=np.float32)
    return cells


@pytest.fixture(scope="module")
def scored(demo_model, heldout) -> tuple[ad.AnnData, pd.DataFrame]:
    """The held-out cells scored through the API (the AnnData gets the scores) and the table returned."""
    cells = heldout.copy()
    return cells, demo_model.score(cells, batch_size=16)


@pytest.fixture(scope="module")
def reference_scores(reference_model, reference_input) -> dict[str, np.ndarray]:
    return reference_model.predict(reference_input, batch_size=16, output_keys=(*SCORE_KEYS, "llh"))


def with_counts(cells: ad.AnnData, counts: sp.csr_matrix) -> ad.AnnData:
    changed = cells.copy()
    changed.X = counts
    return changed


def genes_moved(counts: sp.csr_matrix, rng: np.random.Generator) -> sp.csr_matrix:
    """Each cell's counts, unchanged, on other genes: a random permutation of the genes per cell."""
    dense = counts.toarray()
    return sp.csr_matrix(np.stack([row[rng.permutation(row.size)] for row in dense]))


def counts_permuted(counts: sp.csr_matrix, rng: np.random.Generator) -> sp.csr_matrix:
    """Each cell's genes, unchanged, with their counts shuffled among them."""
    permuted = counts.copy()
    for start, stop in zip(permuted.indptr[:-1], permuted.indptr[1:], strict=True):
        permuted.data[start:stop] = rng.permutation(permuted.data[start:stop])
    return permuted


def n_positions(tokens: np.ndarray, pad_index: int) -> np.ndarray:
    return (tokens != pad_index).sum(1)


def test_a_cells_score_is_the_sum_of_its_gene_scores(demo_model, scored):
    cells, table = scored
    seq_len = demo_model.model.seq_len
    genes_per_cell = np.asarray((cells.X > 0).sum(1)).ravel()
    assert genes_per_cell.max() < seq_len  # no cell is cut: no [END] term
    layer = cells.layers["gene_log_likelihood"]
    assert layer.shape == cells.shape and sp.issparse(layer)
    np.testing.assert_allclose(np.asarray(layer.sum(1)).ravel(), table["log_likelihood"], rtol=1e-5)
    # One entry per gene the cell expresses, on its column of adata.var.
    layer_pattern = layer.copy()
    layer_pattern.data[:] = 1
    assert (layer_pattern != (cells.X > 0)).nnz == 0
    assert np.all(layer.data < 0)


def test_the_anndata_gets_the_table_of_scores(scored):
    cells, table = scored
    assert list(table.columns) == [*CELL_SCORE_KEYS, *QC_COLUMNS]
    assert table.index.equals(cells.obs_names)
    pd.testing.assert_frame_equal(cells.obs[table.columns], table, check_names=False)
    assert table["likelihood_outlier"].dtype == bool
    record = cells.uns[QC_KEY]
    assert record["threshold"] == 3.5 and record["outliers"] == table["likelihood_outlier"].sum()


def test_a_cell_cut_at_seq_len_adds_the_end_term(reference_model, reference_input):
    cells = ad.read_h5ad(reference_input)
    table = reference_model.score(cells, batch_size=16)
    batch = reference_model.tokenize(reference_input).batch(np.arange(cells.n_obs))
    seq_len, special = reference_model.model.seq_len, reference_model.model.special_tokens
    full = (batch.gene_tokens != special.pad).all(1).numpy()
    assert full.any() and not full.all()
    layer = cells.layers["gene_log_likelihood"]
    # The gene at the last position of a full-length cell is never scored: its target is [END].
    np.testing.assert_array_equal(np.diff(layer.indptr)[full], seq_len - 1)
    with torch.no_grad():
        out = reference_model.model(batch.gene_tokens, batch.gene_counts, batch.aux_tokens)
    end = end_target_position(seq_len)
    cap, eps = reference_model.model.model_config.softcap, reference_model.model.model_config.log_counts_eps
    end_targets = torch.full_like(batch.gene_tokens[:, :1], special.end)
    end_gene = gene_cross_entropy(out.gene_logits[:, end : end + 1], end_targets, cap)
    end_count = zero_truncated_poisson_nll(out.mu[:, end], torch.ones(len(cells)), eps)
    end_term = -(end_gene[:, 0] + end_count).numpy()
    np.testing.assert_allclose(
        table["log_likelihood"].to_numpy()[full], np.asarray(layer.sum(1)).ravel()[full] + end_term[full], rtol=1e-5
    )
    np.testing.assert_allclose(
        table["log_likelihood"].to_numpy()[~full], np.asarray(layer.sum(1)).ravel()[~full], rtol=1e-5
    )


def test_the_parts_add_up(reference_model, reference_scores):
    scores = reference_scores
    n = n_positions(scores["gene_token_indices"], reference_model.model.special_tokens.pad)
    np.testing.assert_allclose(
        scores["log_likelihood"], scores["log_likelihood_gene_id"] + scores["log_likelihood_count"], rtol=1e-5
    )
    np.testing.assert_allclose(
        scores["gene_log_likelihood"],
        scores["gene_log_likelihood_gene_id"] + scores["gene_log_likelihood_count"],
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(scores["mean_log_likelihood"], scores["log_likelihood"] / n, rtol=1e-5)
    np.testing.assert_allclose(-scores["log_likelihood_count"] / n, scores["llh"], rtol=1e-5)


def test_the_scores_reproduce_the_original_likelihoods(reference_model, reference_scores, expected):
    """The count part is the original's llh, the gene-id part its gene_llh, with the opposite sign."""
    n = n_positions(expected["gene_token_indices"], reference_model.model.special_tokens.pad)
    np.testing.assert_allclose(-reference_scores["log_likelihood_count"] / n, expected["llh"], rtol=1e-4)
    gene_llh = expected["gene_llh"]
    np.testing.assert_allclose(
        -reference_scores["gene_log_likelihood_gene_id"], gene_llh, rtol=1e-4, atol=1e-4 * np.abs(gene_llh).max()
    )


def test_corrupted_cells_score_lower_than_real_ones(demo_model, heldout, scored):
    real = scored[1]["mean_log_likelihood"].to_numpy()
    rng = np.random.default_rng(0)
    for corrupt in (genes_moved, counts_permuted):
        cells = with_counts(heldout, corrupt(heldout.X, rng))
        corrupted = demo_model.score(cells, batch_size=16)["mean_log_likelihood"].to_numpy()
        assert corrupted.mean() < real.mean(), corrupt.__name__
        assert np.mean(corrupted < real) >= 0.8, (corrupt.__name__, np.mean(corrupted < real))


def test_an_abnormal_cell_is_flagged(tmp_path, capsys, heldout):
    """Through the command: one real cell's counts on random genes, among the real cells, is an outlier."""
    rng = np.random.default_rng(1)
    abnormal = with_counts(heldout[:1], genes_moved(heldout.X[:1], rng))
    abnormal.obs_names = ["abnormal"]
    cells = ad.concat([heldout, abnormal], merge="same")
    data = tmp_path / "cells.h5ad"
    cells.write_h5ad(data)
    code = main(
        ["score", "--checkpoint-path", str(DEMO_MODEL), "--data-file", str(data), "--output-path", str(tmp_path)]
    )
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    output = ad.read_h5ad(tmp_path / "scores.h5ad")
    obs = output.obs
    assert obs.loc["abnormal", "likelihood_outlier"]
    assert obs["likelihood_outlier"].mean() < 0.1
    assert printed[-2].startswith(
        f"Scored {cells.n_obs} of {cells.n_obs} cells; {obs['likelihood_outlier'].sum()} flagged"
    )
    assert printed[-1] == f"Output: {(tmp_path / 'scores.h5ad').resolve()}"
    # The rule as recorded, applied to the scores written.
    record = output.uns[QC_KEY]
    values = obs["mean_log_likelihood"].to_numpy(dtype=np.float64)
    median = np.median(values)
    scale = np.median(np.abs(values - median)) / norm.ppf(0.75)  # 1.4826 x MAD: a normal distribution's SD
    np.testing.assert_allclose([record["median"], record["scale"]], [median, scale], rtol=1e-9)
    np.testing.assert_allclose(obs["mean_log_likelihood_robust_z"], (values - median) / scale, rtol=1e-9)
    assert (obs["likelihood_outlier"] == (obs["mean_log_likelihood_robust_z"] < -record["threshold"])).all()
    assert set(output.layers) == {key for key in SCORE_KEYS if key.startswith("gene_")}


def test_cells_without_counts_are_neither_scored_nor_flagged(reference_model, reference_input):
    cells = ad.read_h5ad(reference_input)
    emptied = np.arange(cells.n_obs) == 3
    cells.X = sp.csr_matrix(sp.diags((~emptied).astype(np.float32)) @ sp.csr_matrix(cells.X))
    cells.X.eliminate_zeros()
    with pytest.warns(UserWarning, match="no count"):
        table = reference_model.score(cells)
    assert np.isnan(table["mean_log_likelihood"].iloc[3]) and np.isnan(table["mean_log_likelihood_robust_z"].iloc[3])
    assert not table["likelihood_outlier"].iloc[3]
    assert cells.layers["gene_log_likelihood"][3].nnz == 0
    others = flag_outliers(table.drop(index=cells.obs_names[3]))[0]
    pd.testing.assert_frame_equal(table.drop(index=cells.obs_names[3]), others)
    assert cells.uns[QC_KEY]["cells_scored"] == cells.n_obs - 1


def test_a_single_cell_gets_no_z_score(reference_model, reference_input):
    with pytest.warns(UserWarning, match="1 cell.* does not vary: no robust z-score"):
        table = reference_model.score(ad.read_h5ad(reference_input)[:1].copy())
    assert np.isfinite(table["log_likelihood"]).all()
    assert np.isnan(table["mean_log_likelihood_robust_z"]).all() and not table["likelihood_outlier"].any()


def test_counts_from_raw_give_gene_scores_on_var(reference_model, reference_input):
    cells = ad.read_h5ad(reference_input)
    reference_model.score(cells)
    on_all_genes = cells.layers["gene_log_likelihood"]
    subset = cells[:, ::2].copy()  # var holds every other gene; raw all of them, and the counts come from raw
    subset.raw = cells
    table = reference_model.score(subset)
    np.testing.assert_array_equal(table["log_likelihood"], cells.obs["log_likelihood"])
    layer = subset.layers["gene_log_likelihood"]
    assert layer.shape == subset.shape
    assert (layer != on_all_genes[:, ::2]).nnz == 0


def test_a_file_gives_the_table_of_its_anndata(reference_model, reference_input):
    cells = ad.read_h5ad(reference_input)
    from_file = reference_model.score(reference_input, batch_size=7)
    pd.testing.assert_frame_equal(from_file, reference_model.score(cells, batch_size=64))


def test_a_bad_threshold_is_refused_before_the_model_runs(reference_model, reference_input):
    for threshold in (0, -1, float("nan")):
        with pytest.raises(ValueError, match=r"^outlier_threshold must be (finite and )?> 0, got "):
            reference_model.score(reference_input, outlier_threshold=threshold)


def score_cli(capsys, tmp_path: Path, *args) -> tuple[int, str]:
    out = tmp_path / "out"
    code, err = run_cli(capsys, "score", "--checkpoint-path", DEMO_MODEL, "--output-path", out, *args)
    assert_no_output(out)
    return code, err


@pytest.mark.parametrize("threshold", ["0", "-2", "nan", "inf", "three"])
def test_a_bad_threshold_is_one_line(capsys, tmp_path, threshold):
    code, err = score_cli(capsys, tmp_path, "--data-file", HELDOUT, "--outlier-threshold", threshold)
    assert_one_line_error(code, err, "score", "--outlier-threshold", threshold, exit_code=2)


def test_a_missing_data_file_is_one_line(capsys, tmp_path):
    code, err = score_cli(capsys, tmp_path, "--data-file", tmp_path / "missing.h5ad")
    assert_one_line_error(code, err, "score", "missing.h5ad")


def test_outputs_without_the_qc_score_are_one_line(capsys, tmp_path):
    code, err = score_cli(capsys, tmp_path, "--data-file", HELDOUT, "--output-keys", "log_likelihood")
    assert_one_line_error(code, err, "score", "mean_log_likelihood", "--output-keys")


def test_an_input_column_named_like_a_qc_column_is_one_line(capsys, tmp_path):
    cells = ad.read_h5ad(HELDOUT)
    cells.obs["likelihood_outlier"] = False
    data = tmp_path / "cells.h5ad"
    cells.write_h5ad(data)
    code, err = score_cli(capsys, tmp_path, "--data-file", data)
    assert_one_line_error(code, err, "score", "likelihood_outlier", "--obs-keys")


def test_the_dry_run_writes_nothing(capsys, tmp_path):
    out = tmp_path / "out"
    assert (
        main(
            [
                "score",
                "--checkpoint-path",
                str(DEMO_MODEL),
                "--data-file",
                str(HELDOUT),
                "--output-path",
                str(out),
                "--dry-run",
            ]
        )
        == 0
    )
    assert f"Outputs: {', '.join(SCORE_KEYS)}" in capsys.readouterr().out
    assert_no_output(out)


def test_resume_refuses_a_run_with_another_outlier_threshold(capsys, tmp_path):
    """The task's settings are part of the run's description: a resumed run with another rule is refused."""
    out = tmp_path / "out"
    args = [
        "score",
        "--checkpoint-path",
        DEMO_MODEL,
        "--data-file",
        HELDOUT,
        "--output-path",
        out,
        "--chunk-size",
        "40",
    ]
    parsed = build_parser(["score"]).parse_args([str(a) for a in args])
    with prepare(run_config_from_args(parsed), torch.device("cpu"), ScoreTask()) as session:  # an interrupted run
        open_parts_dir(session)
        interrupted = part_file(session, session.units[0]).parent
    code, err = run_cli(capsys, *args, "--resume", "--outlier-threshold", "5")
    assert_one_line_error(code, err, "score", "had other settings", "task settings.outlier_threshold")
    assert not (out / "scores.h5ad").exists() and interrupted.is_dir()  # kept for a resume with its settings

    code, err = run_cli(capsys, *args, "--resume", "--outlier-threshold", str(ScoreConfig.outlier_threshold))
    assert code == 0, err
    written = ad.read_h5ad(out / "scores.h5ad")
    assert written.uns[QC_KEY]["threshold"] == ScoreConfig.outlier_threshold
    assert json.loads(written.uns["transcriptformer"]["task"]) == {"name": "score", "settings": asdict(ScoreConfig())}
