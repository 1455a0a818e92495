"""Bad numbers and mismatched checkpoint parts never give a silent wrong result (issue 11).

NaN / infinite / negative counts, non-integer and empty cells, NaN weights, tables and adapters, diverging
fine-tuning, checkpoints whose parts disagree, malformed config.json.

Every bad file is made here from the real files in ``test/data``. Each case runs the real command line in-process
(``transcriptformer.cli.main``) or the Python API and checks the exit code, that no traceback is printed, the key
words of the message, and that no output that looks complete was written.
"""

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_no_output
from transcriptformer.api import TranscriptFormerModel
from transcriptformer.checkpoint import WEIGHTS_FILE, all_finite, load_checkpoint, save_checkpoint
from transcriptformer.cli import main
from transcriptformer.data.vocab import read_embedding_keys, read_embedding_table, write_embedding_table
from transcriptformer.model.lora import ADAPTER_WEIGHTS_FILE, add_lora_adapters, save_adapters
from transcriptformer.pipeline import NonFiniteOutputError
from transcriptformer.training.config import LoraConfig

GENE_FILE = "mus_musculus_gene.h5"


@pytest.fixture
def checkpoint(tmp_path, reference_dir) -> Path:
    """A copy of the reference checkpoint, to damage."""
    target = tmp_path / "ckpt"
    shutil.copytree(reference_dir, target, ignore=shutil.ignore_patterns("expected.npz", "input.h5ad"))
    return target


@pytest.fixture
def cli(capsys):
    """Run the command line in-process: (exit code, stdout + stderr)."""

    def run(*argv: str) -> tuple[int, str]:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return run


def warning_line(text: str, words: str) -> str:
    """The message of the command's one-line warning that contains ``words`` (the CLI prints warnings that way)."""
    lines = [line for line in text.splitlines() if ": warning: " in line and words in line]
    assert len(lines) == 1, text
    return lines[0].split(": warning: ", 1)[1]


def inference_args(checkpoint: Path, data: Path, output: Path, *more: str) -> list[str]:
    return ["inference", "--checkpoint-path", checkpoint, "--data-file", data, "--output-path", output, *more]


def fails(result: tuple[int, str], *words: str, code: int = 1) -> str:
    """Assert a one-line user error with these words; return the message."""
    exit_code, text = result
    assert exit_code == code, text[-2000:]
    assert "Traceback" not in text
    message = next(line for line in text.splitlines() if "error:" in line)
    for word in words:
        assert word in message, (word, message)
    return message


def write_counts(tmp_path: Path, reference_input: Path, edit, name: str = "cells.h5ad") -> Path:
    """The reference cells with ``edit(X)`` applied to their dense counts, written to ``tmp_path / name``."""
    adata = ad.read_h5ad(reference_input)
    X = adata.X.toarray()
    edit(X, adata)
    adata.X = sp.csr_matrix(X)
    adata.write_h5ad(tmp_path / name)
    return tmp_path / name


def read_columns(reference_model, adata: ad.AnnData) -> np.ndarray:
    """Columns of the genes the model reads."""
    return np.flatnonzero(
        reference_model.checkpoint.gene_vocab.lookup(adata.var["ensembl_id"].astype(str).tolist()) >= 0
    )


# --- NaN, infinite and negative counts --------------------------------------------------------------------------


CORRUPTED_CELLS = (5, 40)


def corrupted_column(reference_model, adata: ad.AnnData, row: int) -> int:
    """The column of the first expressed gene read of a cell: the one corrupted."""
    columns = read_columns(reference_model, adata)
    return int(columns[np.flatnonzero(adata.X[row, columns].toarray()[0] > 0)[0]])


def corrupt_entries(reference_model, value: float):
    """An edit that puts ``value`` at the first expressed gene read of the cells :data:`CORRUPTED_CELLS`."""

    def edit(X, adata):
        for row in CORRUPTED_CELLS:
            X[row, corrupted_column(reference_model, adata, row)] = value

    return edit


@pytest.mark.parametrize("value", [np.nan, np.inf, -3.0])
def test_invalid_counts_stop_the_run_naming_file_count_cell_and_gene(
    value, cli, reference_model, reference_input, reference_dir, tmp_path
):
    data = write_counts(tmp_path, reference_input, corrupt_entries(reference_model, value))
    original = ad.read_h5ad(reference_input)
    first_gene = original.var["ensembl_id"].iloc[corrupted_column(reference_model, original, 5)]
    message = fails(
        cli(*inference_args(reference_dir, data, tmp_path / "out")),
        str(data),
        "2 count(s)",
        "NaN, infinite or negative",
        "in 2 cell(s)",
        f"cell {original.obs_names[5]!r} (row 5)",
        first_gene,
        "--invalid-counts drop",
        "--invalid-counts clip",
    )
    assert f"value {value:g}" in message
    assert_no_output(tmp_path / "out")


def test_invalid_counts_drop_leaves_those_cells_out_and_keeps_obs_in_step(
    cli, reference_model, reference_input, reference_dir, expected, tmp_path
):
    data = write_counts(tmp_path, reference_input, corrupt_entries(reference_model, np.nan))
    code, text = cli(*inference_args(reference_dir, data, tmp_path / "out", "--invalid-counts", "drop"))
    assert code == 0, text
    assert warning_line(text, "dropped 2 of 64 cells (2 by invalid_counts=drop)")
    written = ad.read_h5ad(tmp_path / "out" / "embeddings.h5ad")
    kept = np.setdiff1d(np.arange(64), CORRUPTED_CELLS)
    names = ad.read_h5ad(reference_input).obs_names
    assert list(written.obs_names) == list(names[kept])
    np.testing.assert_allclose(written.obsm["X_transcriptformer"], expected["embeddings"][kept], rtol=1e-5, atol=1e-6)
    assert list(written.uns["transcriptformer"]["cells_dropped"]) == [2]


@pytest.mark.parametrize(("value", "becomes"), [(np.nan, 0.0), (-3.0, 0.0), (np.inf, 30.0)])
def test_invalid_counts_clip_reads_them_as_zero_or_the_clip(
    value, becomes, cli, reference_model, reference_input, reference_dir, tmp_path
):
    data = write_counts(tmp_path, reference_input, corrupt_entries(reference_model, value))
    code, text = cli(*inference_args(reference_dir, data, tmp_path / "out", "--invalid-counts", "clip"))
    assert code == 0, text
    repaired = ad.read_h5ad(data)
    X = repaired.X.toarray()
    X[~np.isfinite(X) | (X < 0)] = becomes
    repaired.X = sp.csr_matrix(X)
    written = ad.read_h5ad(tmp_path / "out" / "embeddings.h5ad")
    np.testing.assert_allclose(
        written.obsm["X_transcriptformer"], reference_model.embed(repaired, key_added=None), atol=1e-6
    )


def test_clipping_infinite_counts_needs_a_clip_value(cli, reference_model, reference_input, reference_dir, tmp_path):
    data = write_counts(tmp_path, reference_input, corrupt_entries(reference_model, np.inf))
    args = inference_args(reference_dir, data, tmp_path / "out", "--invalid-counts", "clip")
    fails(
        cli(*args, "--config-override", "model.data_config.clip_counts=null"),
        "2 count(s) are infinite",
        "--clip-counts",
    )
    assert_no_output(tmp_path / "out")


def test_infinite_counts_are_refused_before_normalisation(
    cli, reference_model, reference_input, reference_dir, tmp_path
):
    data = write_counts(tmp_path, reference_input, corrupt_entries(reference_model, np.inf))
    args = inference_args(
        reference_dir, data, tmp_path / "out", "--config-override", "model.data_config.normalize_to_scale=10000"
    )
    fails(cli(*args), str(data), "NaN, infinite or negative", "--invalid-counts")
    assert_no_output(tmp_path / "out")


def test_finetune_refuses_invalid_counts_and_drops_them_on_request(
    cli, reference_model, reference_input, reference_dir, tmp_path
):
    data = write_counts(tmp_path, reference_input, corrupt_entries(reference_model, -1.0))
    args = ["finetune", "--checkpoint-path", reference_dir, "--train-files", data, "--device", "cpu"]
    fails(cli(*args, "--output-path", tmp_path / "adapters"), str(data), "negative", "--invalid-counts drop")
    assert not (tmp_path / "adapters").exists()
    code, text = cli(*args, "--invalid-counts", "drop", "--dry-run")
    assert code == 0 and "Dry-run complete" in text
    assert warning_line(text, "2 by invalid_counts=drop")


# --- Non-integer counts, over the whole input ---------------------------------------------------------------------


def test_non_integer_counts_are_found_in_the_last_chunk(cli, reference_model, reference_input, reference_dir, tmp_path):
    def edit(X, adata):
        columns = read_columns(reference_model, adata)
        X[63, columns[np.flatnonzero(X[63, columns] > 0)[:3]]] = 2.5

    data = write_counts(tmp_path, reference_input, edit)
    last = ad.read_h5ad(data).obs_names[63]
    code, text = cli(*inference_args(reference_dir, data, tmp_path / "out", "--chunk-size", "16"))
    assert code == 0, text
    message = warning_line(text, "not whole numbers")
    assert message.startswith(f"{data}: 3 of ")
    assert f"value 2.5 of cell {last!r} (row 63)" in message and "expects raw counts" in message


# --- Cells without any count ------------------------------------------------------------------------------------


def empty_cells(X, adata):
    X[[3, 10]] = 0


def test_empty_cells_get_nan_outputs_and_are_counted(cli, reference_input, reference_dir, expected, tmp_path):
    data = write_counts(tmp_path, reference_input, empty_cells)
    code, text = cli(*inference_args(reference_dir, data, tmp_path / "out", "--output-keys", "embeddings", "llh"))
    assert code == 0, text
    assert warning_line(text, "2 of 64 cells have no count")
    assert "2 of 64 cells have no count among the" in text and "--drop-empty-cells" in text  # the summary
    written = ad.read_h5ad(tmp_path / "out" / "embeddings.h5ad")
    assert written.n_obs == 64 and list(written.uns["transcriptformer"]["cells_empty"]) == [2]
    embeddings = written.obsm["X_transcriptformer"]
    assert np.isnan(embeddings[[3, 10]]).all() and np.isnan(written.obs["llh"].to_numpy()[[3, 10]]).all()
    others = np.setdiff1d(np.arange(64), [3, 10])
    np.testing.assert_allclose(embeddings[others], expected["embeddings"][others], rtol=1e-5, atol=1e-6)


def test_drop_empty_cells_leaves_them_out(cli, reference_input, reference_dir, expected, tmp_path):
    data = write_counts(tmp_path, reference_input, empty_cells)
    code, text = cli(*inference_args(reference_dir, data, tmp_path / "out", "--drop-empty-cells"))
    assert code == 0, text
    assert warning_line(text, "2 by --drop-empty-cells")
    written = ad.read_h5ad(tmp_path / "out" / "embeddings.h5ad")
    others = np.setdiff1d(np.arange(64), [3, 10])
    assert list(written.obs_names) == list(ad.read_h5ad(reference_input).obs_names[others])
    np.testing.assert_allclose(written.obsm["X_transcriptformer"], expected["embeddings"][others], rtol=1e-5, atol=1e-6)


def test_api_gives_empty_cells_nan_embeddings(reference_model, reference_input, tmp_path):
    data = write_counts(tmp_path, reference_input, empty_cells)
    with pytest.warns(UserWarning, match="their outputs are NaN"):
        embeddings = reference_model.embed(ad.read_h5ad(data))
    assert np.isnan(embeddings[[3, 10]]).all() and np.isfinite(np.delete(embeddings, [3, 10], axis=0)).all()


# --- Settings that would make outputs NaN -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_clip_counts_flag_must_be_a_positive_number(value, cli, reference_input, reference_dir, tmp_path):
    fails(
        cli(*inference_args(reference_dir, reference_input, tmp_path / "out", "--clip-counts", value)),
        "--clip-counts",
        "must be a finite number > 0",
        code=2,
    )
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("model.data_config.clip_counts=-5", "data_config.clip_counts must be > 0"),
        ("model.data_config.normalize_to_scale=-1", "data_config.normalize_to_scale must be >= 0"),
        ("model.data_config.invalid_counts=ignore", "data_config.invalid_counts must be one of"),
        ("model.model_config.num_heads=0", "model_config.num_heads must be >= 1"),
    ],
)
def test_config_overrides_are_checked(override, words, cli, reference_input, reference_dir, tmp_path):
    args = inference_args(reference_dir, reference_input, tmp_path / "out", "--config-override", override)
    fails(cli(*args), words)
    assert_no_output(tmp_path / "out")


def test_nan_weights_found_after_loading_stop_the_batch_loop(reference_dir, reference_input):
    model = load_checkpoint(reference_dir)
    with torch.no_grad():
        model.model.transformer_encoder.encoder_layers[0].linear1.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteOutputError, match=r"embeddings output is NaN or infinite for (\d+) of the \1 cells"):
        TranscriptFormerModel(model, torch.device("cpu")).predict(reference_input, batch_size=64)


def test_non_finite_inputs_stop_the_batch_loop(reference_model, reference_input):
    cells = reference_model.tokenize(reference_input, clip_counts=None)
    cells.counts.data[0] = np.inf  # tokenized by hand, past the checks of the tokenizer
    with pytest.raises(NonFiniteOutputError, match=f"first: cell {cells.obs_names[0]!r}"):
        reference_model.predict(cells)


# --- NaN weights, tables and adapters --------------------------------------------------------------------------


def damage_weights(checkpoint: Path, key: str, index: tuple) -> None:
    state = torch.load(checkpoint / WEIGHTS_FILE, weights_only=True)
    state[key][index] = float("nan")
    torch.save(state, checkpoint / WEIGHTS_FILE)


def test_nan_weights_are_refused(cli, checkpoint, reference_input, tmp_path):
    damage_weights(checkpoint, "transformer_encoder.encoder_layers.1.linear2.weight", (3, 4))
    fails(
        cli(*inference_args(checkpoint, reference_input, tmp_path / "out")),
        str(checkpoint / WEIGHTS_FILE),
        "1 weight tensor(s) hold NaN",
        "transformer_encoder.encoder_layers.1.linear2.weight",
    )
    assert_no_output(tmp_path / "out")


def test_a_weight_tensor_is_finite_even_where_its_sum_overflows():
    assert all_finite(torch.tensor([3e38, 3e38, -1.0]))  # the sum is infinite, no value is
    assert not all_finite(torch.tensor([1.0, float("inf"), 2.0]))
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))  # the sum is NaN
    assert not all_finite(torch.tensor([[0.5, float("nan")]], dtype=torch.bfloat16))
    assert all_finite(torch.zeros(0))


def test_nan_embedding_table_rows_are_refused_naming_the_gene(cli, checkpoint, reference_input, tmp_path):
    damage_weights(checkpoint, "gene_embeddings.embedding.weight", (12,))  # row 12: the 6th gene after 7 tokens
    keys = read_embedding_keys(checkpoint / "vocabs" / GENE_FILE)
    fails(
        cli(*inference_args(checkpoint, reference_input, tmp_path / "out")),
        "gene_embeddings.embedding.weight",
        keys[12 - 7],
    )
    assert_no_output(tmp_path / "out")


def test_pretrained_embedding_with_nan_vectors_is_refused(cli, reference_dir, reference_input, tmp_path):
    ids, table = read_embedding_table(reference_dir / "vocabs" / GENE_FILE)
    table[20] = np.nan
    write_embedding_table(tmp_path / "other_gene.h5", dict(zip(ids, table, strict=True)))
    args = inference_args(
        reference_dir, reference_input, tmp_path / "out", "--pretrained-embedding", tmp_path / "other_gene.h5"
    )
    fails(cli(*args), str(tmp_path / "other_gene.h5"), "1 gene(s) hold NaN", ids[20])
    assert_no_output(tmp_path / "out")


@pytest.fixture
def nan_adapter(tmp_path, reference_dir) -> Path:
    """Real LoRA adapters of the reference checkpoint, one of whose values is NaN (as a diverged run leaves them)."""
    model = add_lora_adapters(load_checkpoint(reference_dir).model, LoraConfig(r=2), str(reference_dir))
    path = save_adapters(model, tmp_path / "adapter")
    tensors = load_file(path / ADAPTER_WEIGHTS_FILE)
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path / ADAPTER_WEIGHTS_FILE)
    return path


def test_merge_adapters_refuses_nan_adapters(cli, nan_adapter, reference_dir, tmp_path):
    args = ["merge-adapters", "--checkpoint-path", reference_dir, "--adapter", nan_adapter]
    fails(cli(*args, "--output-path", tmp_path / "merged"), str(nan_adapter / ADAPTER_WEIGHTS_FILE), "NaN", "lora_A")
    assert not (tmp_path / "merged" / WEIGHTS_FILE).exists()


def test_inference_refuses_nan_adapters(cli, nan_adapter, reference_dir, reference_input, tmp_path):
    args = inference_args(reference_dir, reference_input, tmp_path / "out", "--adapter", nan_adapter)
    fails(cli(*args), "adapter tensor(s) hold NaN", "--lr")
    assert_no_output(tmp_path / "out")


def test_finetune_stops_when_the_loss_diverges_and_saves_no_adapters(cli, reference_dir, reference_input, tmp_path):
    args = ["finetune", "--checkpoint-path", reference_dir, "--train-files", reference_input, "--device", "cpu"]
    output = tmp_path / "adapters"
    result = cli(*args, "--output-path", output, "--lr", "1e30", "--max-steps", "3", "--batch-size", "8")
    fails(result, "the training loss is nan at optimizer step 1", "diverged", "--lr")
    assert not list(output.rglob(ADAPTER_WEIGHTS_FILE)) and not list(output.rglob("*.ckpt"))


# --- Checkpoints whose parts disagree ---------------------------------------------------------------------------


def edit_config(checkpoint: Path, edit) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    edit(config["model"])
    (checkpoint / "config.json").write_text(json.dumps(config))


def test_reordered_vocabulary_keys_are_refused(cli, checkpoint, reference_input, tmp_path):
    ids, table = read_embedding_table(checkpoint / "vocabs" / GENE_FILE)
    order = np.random.default_rng(0).permutation(len(ids))  # each gene keeps its vector, the order changes
    write_embedding_table(checkpoint / "vocabs" / GENE_FILE, {ids[i]: table[i] for i in order})
    fails(
        cli(*inference_args(checkpoint, reference_input, tmp_path / "out")),
        "do not match the vectors",
        GENE_FILE,
        "restore the checkpoint's own vocabs/",
    )
    assert_no_output(tmp_path / "out")


def test_vocabulary_with_other_vectors_is_refused(cli, checkpoint, reference_input, tmp_path):
    ids, table = read_embedding_table(checkpoint / "vocabs" / GENE_FILE)
    other = np.random.default_rng(1).normal(table.mean(), table.std(), table.shape).astype(np.float32)
    write_embedding_table(checkpoint / "vocabs" / GENE_FILE, dict(zip(ids, other, strict=True)))
    fails(cli(*inference_args(checkpoint, reference_input, tmp_path / "out")), "do not match the vectors")
    assert_no_output(tmp_path / "out")


@pytest.fixture
def saved_checkpoint(tmp_path, reference_dir) -> Path:
    """The reference checkpoint written by this package (its weights record seq_len and the other settings)."""
    loaded = load_checkpoint(reference_dir)
    gene_files = [reference_dir / "vocabs" / GENE_FILE]
    return save_checkpoint(tmp_path / "saved", loaded.config, loaded.model, loaded.aux_vocabs, gene_files)


def test_saved_checkpoint_still_loads_and_matches(saved_checkpoint, reference_input, expected):
    model = TranscriptFormerModel(load_checkpoint(saved_checkpoint), torch.device("cpu"))
    np.testing.assert_allclose(model.embed(reference_input), expected["embeddings"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("key", "value"), [("seq_len", 100), ("num_heads", 2)])
def test_config_settings_that_differ_from_the_weights_are_refused(
    key, value, cli, saved_checkpoint, reference_input, tmp_path
):
    original = json.loads((saved_checkpoint / "config.json").read_text())["model"]["model_config"][key]
    edit_config(saved_checkpoint, lambda m: m["model_config"].update({key: value}))
    fails(
        cli(*inference_args(saved_checkpoint, reference_input, tmp_path / "out")),
        f"model_config.{key} is {value} but the weights were saved with {original}",
    )
    assert_no_output(tmp_path / "out")


def test_config_override_of_seq_len_is_refused_for_recorded_weights(cli, saved_checkpoint, reference_input, tmp_path):
    args = inference_args(saved_checkpoint, reference_input, tmp_path / "out")
    result = cli(*args, "--config-override", "model.model_config.seq_len=63")
    fails(result, "model_config.seq_len is 63", "(and drop any --config-override of them)")


def test_architecture_that_differs_from_the_weights_is_refused(cli, checkpoint, reference_input, tmp_path):
    edit_config(checkpoint, lambda m: m["model_config"].update(model_dim=96))
    fails(
        cli(*inference_args(checkpoint, reference_input, tmp_path / "out")),
        "does not hold the weights that config.json describes",
        "linear1.weight is (128, 64) in the weights, (96, 64) by the config",
    )
    assert_no_output(tmp_path / "out")


# --- Malformed config.json ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[1, 2]", "the config must be a JSON object"),
        ('"a string"', "the config must be a JSON object"),
        ('{"model": {"model_config": {"num_heads": 0}}}', "model_config.num_heads must be >= 1, got 0"),
        ('{"model": {"model_config": {"seq_len": 127.5}}}', "model_config.seq_len must be an integer, got 127.5"),
        ('{"model": {"model_config": {"seq_len": "127"}}}', "model_config.seq_len must be an integer, got '127'"),
        ('{"model": {"data_config": [1]}}', "data_config must be a JSON object"),
        ('{"model": {"data_config": {"pad_zeros": "no"}}}', "data_config.pad_zeros must be true or false"),
        ('{"model": {"loss_config": {"gene_id_loss_weight": -1}}}', "loss_config.gene_id_loss_weight must be >= 0"),
        ('{"model": ', "Expecting value"),
    ],
)
def test_malformed_config_names_the_file_and_key(text, words, cli, checkpoint, reference_input, tmp_path):
    (checkpoint / "config.json").write_text(text)
    fails(cli(*inference_args(checkpoint, reference_input, tmp_path / "out")), str(checkpoint / "config.json"), words)
    assert_no_output(tmp_path / "out")
