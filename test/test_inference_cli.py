"""``transcriptformer inference`` flags on real cells: dry run, overrides, several files, output handling, errors."""

import argparse
import json

import anndata as ad
import numpy as np
import pytest

from conftest import DATA_DIR
from transcriptformer.cli import build_parser, main
from transcriptformer.cli.inference import config_from_args

MOUSE_10X = DATA_DIR / "mouse_10x_40cells.h5ad"  # 40 real mouse 10x cells, another gene set than the fixture's
HUMAN_PBMC = DATA_DIR / "pbmc_40cells.h5ad"  # 40 real human PBMCs: no gene in the mouse vocabulary

ORIGINAL_FLAGS = [
    "--checkpoint-path",
    "--data-file",
    "--output-path",
    "--output-filename",
    "--batch-size",
    "--gene-col-name",
    "--precision",
    "--pretrained-embedding",
    "--clip-counts",
    "--filter-to-vocabs",
    "--use-raw",
    "--emb-type",
    "--model-type",
    "--remove-duplicate-genes",
    "--device",
    "--num-gpus",
    "--n-data-workers",
    "--oom-dataloader",
    "--disable-compile-block-mask",
    "--obs-keys",
    "--output-keys",
    "--config-override",
    "--dry-run",
    "--overwrite",
]


@pytest.fixture
def inference(reference_dir, tmp_path):
    """Run the command in-process on the reference checkpoint; returns (exit code, output path)."""

    def run(*args: str, data=None) -> tuple[int, object]:
        files = [str(f) for f in data] if data else [str(reference_dir / "input.h5ad")]
        output = tmp_path / "out"
        code = main(
            ["inference", "--checkpoint-path", str(reference_dir), "--data-file", *files, "--output-path", str(output)]
            + list(args)
        )
        return code, output / "embeddings.h5ad"

    return run


def inference_parser() -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["inference"]


def test_every_flag_of_the_original_is_there_and_explained(capsys):
    parser = inference_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert set(ORIGINAL_FLAGS) <= flags
    assert "--no-filter-to-vocabs" in flags
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "inference" in capsys.readouterr().out


def test_defaults_are_those_of_the_original(reference_dir):
    args = inference_parser().parse_args(["--checkpoint-path", str(reference_dir), "--data-file", "x.h5ad"])
    assert (args.output_path, args.output_filename) == ("./inference_results", "embeddings.h5ad")
    assert (args.use_raw, args.emb_type, args.model_type) == ("auto", "cell", "transcriptformer")
    config = config_from_args(args)  # the data settings come from the checkpoint (a published config.json)
    data, predict = config.model.data_config, config.predict
    assert (predict.batch_size, data.gene_col_name, data.clip_counts, data.filter_to_vocabs) == (
        8,
        "ensembl_id",
        30.0,
        True,
    )
    assert predict.output_keys == ("embeddings",)
    assert (args.device, args.num_gpus, args.n_data_workers, args.obs_keys) == ("auto", 1, 0, ["all"])
    assert args.precision is None  # 16-mixed on CUDA, 32 elsewhere


def test_dry_run_prints_the_plan_and_writes_nothing(inference, reference_dir, capsys):
    code, output = inference("--dry-run", data=[reference_dir / "input.h5ad", MOUSE_10X])
    assert code == 0
    plan = capsys.readouterr().out
    assert "input.h5ad: 64 cells, 1024 of 1122 genes in the vocabulary" in plan
    assert "mouse_10x_40cells.h5ad: 40 cells, 38 of 1000 genes in the vocabulary" in plan
    assert "104 cells in 23 batches of up to 8 cells" in plan
    assert "Device: cpu (1 process), precision 32" in plan
    assert not output.parent.exists()


def test_dry_run_reports_an_existing_output(inference, capsys):
    output = inference()[1]
    before = output.read_bytes()
    code, _ = inference("--dry-run")
    assert code == 0 and "(exists; the run would stop: pass --overwrite to replace it)" in capsys.readouterr().out
    code, _ = inference("--dry-run", "--overwrite")
    assert code == 0 and "(exists; will be replaced)" in capsys.readouterr().out
    code, _ = inference()
    assert code == 1 and "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert output.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "data", "message"),
    [
        ((), [HUMAN_PBMC], "none of the 2000 genes of the data is in the model's vocabulary"),
        ((), [DATA_DIR / "missing.h5ad"], "no such file"),
        (("--use-raw", "true"), None, "use_raw=True but"),
        (("--obs-keys", "cell_type", "no_such_column"), None, "obs has no column(s) ['no_such_column']"),
        (("--model-type", "esm2ce", "--output-keys", "llh"), None, "esm2ce only computes cell embeddings"),
        (("--config-override", "model.inference_config.batch_size=abc"), None, "batch_size=abc"),
        (("--config-override", "model.no_such_key=1"), None, "Key 'no_such_key' not in"),
        (("--config-override", "model.inference_config.output_keys=[embeddings,likelihood]"), None, "likelihood"),
    ],
)
def test_bad_input_is_a_clear_error(inference, capsys, args, data, message):
    code, output = inference("--dry-run", *args, data=data)
    assert code == 1
    assert message in capsys.readouterr().err
    assert not output.parent.exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path, reference_input, capsys):
    code = main(["inference", "--checkpoint-path", str(tmp_path), "--data-file", str(reference_input)])
    assert code == 1
    assert "is not a TranscriptFormer checkpoint: config.json is missing" in capsys.readouterr().err


def test_overrides_use_hydra_grammar_lists_included(inference, reference_model, reference_input):
    code, output = inference(
        "--config-override",
        "model.inference_config.output_keys=[embeddings,llh]",
        "--config-override",
        "output.obs_keys=[cell_type,assay]",
        "--config-override",
        "model.data_config.clip_counts=5",
    )
    assert code == 0
    adata = ad.read_h5ad(output)
    assert list(adata.obs.columns) == ["cell_type", "assay", "source_file", "llh"]
    api = reference_model.predict(reference_input, output_keys=("embeddings", "llh"), clip_counts=5)
    np.testing.assert_array_equal(adata.obsm["X_transcriptformer"], api["embeddings"])
    np.testing.assert_array_equal(adata.obs["llh"], api["llh"])
    settings = json.loads(adata.uns["transcriptformer"]["config"])
    assert settings["model"]["data_config"]["clip_counts"] == 5
    assert settings["predict"]["output_keys"] == ["embeddings", "llh"]
    assert settings["output"]["obs_keys"] == ["cell_type", "assay"]


def test_several_files_with_different_genes(inference, reference_model, reference_input):
    code, output = inference("--output-keys", "embeddings", "mu", data=[reference_input, MOUSE_10X])
    assert code == 0
    adata = ad.read_h5ad(output)
    first, second = ad.read_h5ad(reference_input), ad.read_h5ad(MOUSE_10X)
    assert list(adata.obs_names) == list(first.obs_names) + list(second.obs_names)
    assert list(adata.obs["source_file"].cat.categories) == [str(reference_input), str(MOUSE_10X)]
    assert (adata.obs["source_file"][:64] == str(reference_input)).all()
    # columns that only the first file has are missing, not invented, for the second file's cells
    assert adata.obs["cell_type"][64:].isna().all() and adata.obs["cell_type"][:64].notna().all()

    # the gene axis is every gene matched in either file, the first file's first
    api_first, api_second = (reference_model.predict(f, output_keys=("embeddings", "mu")) for f in (first, second))
    vocab_ids = np.array(list(reference_model.checkpoint.gene_vocab.index))
    first_genes = vocab_ids[np.unique(api_first["gene_token_indices"][api_first["gene_token_indices"] != 1])]
    assert set(first_genes) <= set(adata.var_names[:1024])
    assert adata.n_vars == len(set(adata.var_names[:1024]) | set(second.var["ensembl_id"].dropna()) & set(vocab_ids))
    # with the var columns of both files: each gene's values from the first file that has them
    assert list(adata.var.columns) == [*first.var.columns, "input_var_name", "gene_symbol", "symbol"]
    first_var, second_var = (
        v.var.reset_index().set_index("ensembl_id").reindex(adata.var_names) for v in (first, second)
    )
    assert list(adata.var["gene_name"]) == list(first_var["gene_name"])
    assert list(adata.var["input_var_name"]) == list(first_var["index"])
    in_second = second_var["gene_symbol"].notna().to_numpy()
    assert 0 < in_second.sum() < adata.n_vars  # genes of both files get the second file's symbols, others none
    assert list(adata.var["gene_symbol"][in_second]) == list(second_var["gene_symbol"][in_second])
    assert adata.var["gene_symbol"][~in_second].isna().all()

    np.testing.assert_array_equal(
        adata.obsm["X_transcriptformer"], np.concatenate([api_first["embeddings"], api_second["embeddings"]])
    )
    mu = adata.layers["mu"]
    np.testing.assert_allclose(
        mu.sum(1).A1, np.concatenate([api_first["mu"].sum(1), api_second["mu"].sum(1)]), rtol=1e-6
    )


def test_existing_output_is_kept_unless_overwrite(inference, capsys):
    code, output = inference()
    assert code == 0
    before = output.read_bytes()
    code, _ = inference("--output-keys", "llh")
    assert code == 1
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert output.read_bytes() == before
    code, _ = inference("--output-keys", "llh", "--overwrite")
    assert code == 0
    assert "llh" in ad.read_h5ad(output).obs and "embeddings" not in ad.read_h5ad(output).obsm


def test_esm2ce_is_the_mean_of_raw_gene_embedding_rows(inference, reference_model, reference_input):
    code, output = inference("--model-type", "esm2ce")
    assert code == 0
    embeddings = ad.read_h5ad(output).obsm["X_transcriptformer"]
    table = reference_model.model.gene_embeddings.embedding.weight.numpy()  # the frozen table of the weights
    tokens = reference_model.tokenize(reference_input).batch(np.arange(64)).gene_tokens.numpy()
    assert embeddings.shape == (64, table.shape[1])
    for cell in (0, 17, 63):
        genes = tokens[cell][tokens[cell] != 1]
        np.testing.assert_allclose(embeddings[cell], table[genes].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # each precision in its own process; bf16 compiles its attention loop (about 25 s)
def test_mixed_precision_runs_on_cpu_and_stays_close(inference, reference_model, reference_input):
    code, output = inference("--precision", "bf16-mixed", "--output-keys", "embeddings", "llh")
    assert code == 0
    adata = ad.read_h5ad(output)
    assert adata.uns["transcriptformer"]["precision"] == "bf16-mixed"
    api = reference_model.predict(reference_input, output_keys=("embeddings", "llh"))
    assert not np.array_equal(adata.obsm["X_transcriptformer"], api["embeddings"])  # it did run in bfloat16
    np.testing.assert_allclose(adata.obs["llh"], api["llh"], rtol=0.05)
    similarity = (adata.obsm["X_transcriptformer"] * api["embeddings"]).sum(1) / (
        np.linalg.norm(adata.obsm["X_transcriptformer"], axis=1) * np.linalg.norm(api["embeddings"], axis=1)
    )
    assert similarity.min() > 0.99


def test_reading_ahead_in_threads_gives_the_same_file(inference, reference_dir):
    args = ("--output-keys", "embeddings", "mu", "--config-override", "model.inference_config.chunk_size=10")
    code, output = inference(*args)
    assert code == 0
    plain = ad.read_h5ad(output)
    code, output = inference(*args, "--n-data-workers", "2", "--overwrite")
    assert code == 0
    threaded = ad.read_h5ad(output)
    np.testing.assert_array_equal(threaded.obsm["X_transcriptformer"], plain.obsm["X_transcriptformer"])
    assert (threaded.layers["mu"] != plain.layers["mu"]).nnz == 0
