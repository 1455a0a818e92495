"""Fine-tuning for cell classification (finetune --task classify, predict-labels, model.classify).

On 200 real mouse brain cells of the five largest cell types of ``mouse_brain_1k.h5ad`` (plus three pericytes,
a class too small to train on), with the bundled demo model.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sklearn.metrics import f1_score

import transcriptformer
from conftest import DATA_DIR, REFERENCE_DIR, assert_no_output
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.cli import main
from transcriptformer.errors import UserError
from transcriptformer.model.classifier import CLASSIFIER_CONFIG_FILE, CLASSIFIER_WEIGHTS_FILE
from transcriptformer.model.lora import ADAPTER_WEIGHTS_FILE
from transcriptformer.training.config import (
    ClassifyConfig,
    FinetuneConfig,
    LoraConfig,
    OptimConfig,
    TrainDataConfig,
    TrainerConfig,
)
from transcriptformer.training.datamodule import split_rows
from transcriptformer.training.run import run_finetuning

DEMO = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"
LABEL = "cell_type"
TYPES = 5


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    """200 cells of the five largest cell types and 3 pericytes (a class under the 10 cells trained on)."""
    adata = ad.read_h5ad(DATA_DIR / "mouse_brain_1k.h5ad")
    types = adata.obs[LABEL].value_counts().index[:TYPES]
    rng = np.random.default_rng(0)
    common = rng.choice(np.flatnonzero(adata.obs[LABEL].isin(types)), 200, replace=False)
    rare = np.flatnonzero(adata.obs[LABEL] == "pericyte")[:3]
    path = tmp_path_factory.mktemp("cells") / "cells.h5ad"
    adata[np.sort(np.concatenate([common, rare]))].copy().write_h5ad(path)
    return path


def classify_config(cells: Path, output: Path, **trainer) -> FinetuneConfig:
    return FinetuneConfig(
        checkpoint_path=str(DEMO),
        output_path=str(output),
        task="classify",
        data=TrainDataConfig(train_files=[str(cells)], val_fraction=0.25, batch_size=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        trainer=TrainerConfig(device="cpu", log_every_n_steps=1, **trainer),
        lora=LoraConfig(r=4, alpha=8),
        classify=ClassifyConfig(label_key=LABEL),
    )


class KeepModule(Callback):
    """Keeps the LightningModule of the run, to compare it with what was saved."""

    def on_fit_start(self, trainer, pl_module):
        self.module = pl_module


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cells):
    """A classifier trained for 4 epochs, and the module that trained it (with its best weights restored)."""
    keep = KeepModule()
    with pytest.warns(UserWarning, match="1 class\\(es\\) of 'cell_type' have fewer than 10 training cells"):
        output = run_finetuning(
            classify_config(cells, tmp_path_factory.mktemp("classify") / "classifier", max_epochs=4), callbacks=[keep]
        )
    return output, keep.module


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = pd.Categorical(ad.read_h5ad(DATA_DIR / "mouse_brain_1k.h5ad").obs[LABEL]).codes
    common = np.isin(labels, np.flatnonzero(np.bincount(labels) >= 10))
    strata = labels[common]
    train, val = split_rows(len(strata), 0.15, seed=3, strata=strata)
    assert len(val) == round(0.15 * len(strata)) and np.union1d(train, val).size == len(strata)
    assert set(strata[train]) == set(strata[val]) == set(strata)
    shares = np.bincount(strata[val], minlength=strata.max() + 1) / len(val)
    np.testing.assert_allclose(shares, np.bincount(strata) / len(strata), atol=1.5 / len(val))
    again = split_rows(len(strata), 0.15, seed=3, strata=strata)
    assert np.array_equal(again[1], val) and not np.array_equal(split_rows(len(strata), 0.15, 4, strata)[1], val)
    with pytest.raises(ValueError, match="needs at least one cell of each of the 11 classes"):
        split_rows(len(strata), 0.005, seed=3, strata=strata)


def validation_f1(output: Path) -> np.ndarray:
    return pd.read_csv(output / "training_run" / "metrics.csv")["val/macro_f1"].dropna().to_numpy()


def test_validation_macro_f1_rises_and_the_best_weights_are_saved(trained, cells, tmp_path):
    output, _ = trained
    f1 = validation_f1(output)
    assert len(f1) == 4 and np.all((0 <= f1) & (f1 <= 1))
    # The same seed and validation cells after a single optimizer step: about chance.
    untrained = validation_f1(run_finetuning(classify_config(cells, tmp_path / "one-step", max_steps=1)))
    assert f1.max() > untrained[0] + 0.3, (untrained, f1)

    best = next((output / "training_run" / "checkpoints").glob("epoch=*.ckpt"))  # the one kept: the best
    head = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    saved = load_file(output / CLASSIFIER_WEIGHTS_FILE)
    for key, value in saved.items():
        torch.testing.assert_close(value, head[f"head.{key}"], rtol=0, atol=0)
    info = json.loads((output / CLASSIFIER_CONFIG_FILE).read_text())
    sizes = ad.read_h5ad(DATA_DIR / "mouse_brain_1k.h5ad").obs[LABEL].value_counts()
    assert info["label_key"] == LABEL and info["classes"] == sorted(sizes.index[:TYPES])  # pericytes left out
    with safe_open(str(output / CLASSIFIER_WEIGHTS_FILE), framework="pt") as f:
        assert json.loads(f.metadata()["classes"]) == info["classes"]


def test_saved_classifier_gives_the_probabilities_of_the_trained_one(trained, cells):
    output, module = trained
    model = transcriptformer.load(DEMO, device="cpu", adapter=output)
    adata = ad.read_h5ad(cells)
    probabilities = model.classify(adata)
    assert list(probabilities.columns) == model.classifier.info.classes
    assert probabilities.index.equals(adata.obs_names)

    tokenized = model.tokenize(cells)
    batch = tokenized.batch(np.arange(32))
    module.eval()
    with torch.no_grad():  # the adapters unmerged, as trained
        expected = torch.softmax(module.logits(batch), dim=-1).numpy()
    np.testing.assert_allclose(probabilities.to_numpy()[:32], expected, rtol=0, atol=2e-5)

    again = transcriptformer.load(DEMO, device="cpu", adapter=output).classify(cells)
    np.testing.assert_array_equal(again.to_numpy(), probabilities.to_numpy())


def test_training_is_deterministic_with_a_seed(cells, tmp_path, monkeypatch):
    # Both runs on as many CPU threads: the default follows the machine's load, and another count changes sums.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    first, second = (run_finetuning(classify_config(cells, tmp_path / name, max_steps=3)) for name in "ab")
    for name in (ADAPTER_WEIGHTS_FILE, CLASSIFIER_WEIGHTS_FILE):
        a, b = load_file(first / name), load_file(second / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_predict_labels_writes_classes_and_probabilities(trained, cells, tmp_path, capsys):
    output, _ = trained
    args = ["--checkpoint-path", DEMO, "--adapter", output, "--data-file", cells, "--output-path", tmp_path]
    assert main(["predict-labels", *map(str, args), "--device", "cpu", "--keep-counts"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"Output: {(tmp_path / 'predicted_labels.h5ad').resolve()}"
    labelled = ad.read_h5ad(tmp_path / "predicted_labels.h5ad")
    source = ad.read_h5ad(cells)
    assert labelled.obs_names.equals(source.obs_names)
    assert labelled.var_names.equals(source.var_names) and (labelled.X != source.X).nnz == 0  # --keep-counts
    assert (labelled.obs[LABEL].astype(str) == source.obs[LABEL].astype(str)).all()  # the input's obs is kept
    classes = json.loads((output / CLASSIFIER_CONFIG_FILE).read_text())["classes"]
    assert list(labelled.uns["cell_type_probabilities"]["classes"]) == classes
    probabilities = labelled.obsm["cell_type_probabilities"]
    assert probabilities.shape == (source.n_obs, TYPES)
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)
    predicted = labelled.obs["predicted_cell_type"]
    assert list(predicted.cat.categories) == classes
    assert (predicted.to_numpy() == np.asarray(classes)[probabilities.argmax(1)]).all()
    np.testing.assert_allclose(labelled.obs["predicted_cell_type_probability"], probabilities.max(1), rtol=1e-6)
    truth = source.obs[LABEL].astype(str).to_numpy()
    common = np.isin(truth, classes)
    # After 4 epochs the classifier beats the majority class (38% of these cells) by far, on every class on average.
    assert (predicted.to_numpy()[common] == truth[common]).mean() > 0.6
    assert f1_score(truth[common], predicted.to_numpy()[common], average="macro") > 0.5


def finetune_args(cells: Path, output: Path, *extra) -> list:
    return ["finetune", "--checkpoint-path", DEMO, "--train-files", cells, "--output-path", output, "--device", "cpu",
            "--max-steps", "1", *extra]  # fmt: skip


def test_the_classify_flags_reach_a_dry_run(cells, tmp_path, capsys):
    extra = ["--task", "classify", "--label-key", LABEL, "--val-fraction", "0.2", "--head-hidden-dim", "16"]
    assert main([str(arg) for arg in finetune_args(cells, tmp_path / "classifier", *extra, "--dry-run")]) == 0
    out, err = capsys.readouterr()
    assert "warning: 1 class(es) of 'cell_type' have fewer than 10 training cells" in err
    assert "(cross-entropy), accuracy" in out and "Dry-run complete" in out
    assert not (tmp_path / "classifier").exists()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--task", "classify", "--label-key", "celltype"], ["no obs column 'celltype'", "cell_type"]),
        (["--task", "classify", "--label-key", "organism"], ["'organism'", "1 class(es)", "at least two"]),
        (["--task", "classify"], ["the classify task needs --label-key"]),
        (["--label-key", LABEL], ["--label-key is for the classify task", "--task classify"]),
        (["--task", "classify", "--label-key", LABEL, "--train-heads"], ["--train-heads"]),
    ],
    ids=["wrong-key", "single-class", "no-key", "key-without-task", "train-heads"],
)
def test_classify_mistakes_are_one_line_errors(cells, tmp_path, capsys, extra, words):
    output = tmp_path / "classifier"
    code, err = run_cli(capsys, *finetune_args(cells, output, *extra))
    assert_one_line_error(code, err, "finetune", *words)
    assert not output.exists()


def classifier_copy(trained, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained[0], tmp_path / "copy", ignore=shutil.ignore_patterns("training_run")))


def test_a_classifier_of_another_checkpoint_is_refused(trained, cells, tmp_path, capsys):
    output = tmp_path / "predictions"
    args = ["--checkpoint-path", REFERENCE_DIR, "--adapter", trained[0], "--data-file", cells, "--output-path", output]
    code, err = run_cli(capsys, "predict-labels", *args)
    assert_one_line_error(code, err, "predict-labels", "trained on the checkpoint", str(DEMO), "--checkpoint-path")
    assert_no_output(output)


def test_a_head_of_another_label_set_is_refused(trained, tmp_path):
    copy = classifier_copy(trained, tmp_path)
    info = json.loads((copy / CLASSIFIER_CONFIG_FILE).read_text())
    info["classes"] = info["classes"][1:] + info["classes"][:1]  # the same names, in another order
    (copy / CLASSIFIER_CONFIG_FILE).write_text(json.dumps(info))
    with pytest.raises(UserError, match="the two files come from different runs"):
        transcriptformer.load(DEMO, device="cpu", adapter=copy)


def test_adapters_other_than_the_heads_are_refused(trained, tmp_path):
    copy = classifier_copy(trained, tmp_path)
    adapters = load_file(copy / ADAPTER_WEIGHTS_FILE)
    save_file({key: value * 2 for key, value in adapters.items()}, copy / ADAPTER_WEIGHTS_FILE)
    with pytest.raises(UserError, match="is not the adapter file the classifier head .* was trained with"):
        transcriptformer.load(DEMO, device="cpu", adapter=copy)


def test_classify_needs_a_classifier(cells):
    with pytest.raises(UserError, match="this model has no classifier"):
        transcriptformer.load(DEMO, device="cpu").classify(cells)


def test_the_seed_style_entry_takes_the_classify_task(cells, tmp_path):
    # finetune_lora.py in a fresh process, as a user runs it (test_cli_smoke runs it in-process)
    script = DEMO.parent.parent / "finetune_lora.py"
    flags = ["--task", "classify", "--label-key", LABEL, "--device", "cpu", "--dry-run"]
    command = [sys.executable, str(script), "--checkpoint-path", str(DEMO), "--train-files", str(cells), *flags]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "(cross-entropy), accuracy" in result.stdout and "Dry-run complete" in result.stdout


def predict_labels_command(trained, cells: Path, output: Path, *extra) -> list[str]:
    args = ["predict-labels", "--checkpoint-path", DEMO, "--adapter", trained[0], "--data-file", cells,
            "--output-path", output, "--device", "cpu", "--batch-size", "1", "--chunk-size", "8", *extra]  # fmt: skip
    return [sys.executable, "-m", "transcriptformer", *map(str, args)]


def assert_same_labels(labelled: ad.AnnData, whole: ad.AnnData) -> None:
    assert labelled.obs.equals(whole.obs)
    np.testing.assert_array_equal(labelled.obsm["cell_type_probabilities"], whole.obsm["cell_type_probabilities"])
    np.testing.assert_array_equal(labelled.obsm["X_transcriptformer"], whole.obsm["X_transcriptformer"])


@pytest.mark.slow  # four fresh processes
def test_predict_labels_resumes_and_runs_in_two_processes_as_one_run(trained, cells, tmp_path):
    from test_inference_resume import kill_after_some_units

    whole_command = predict_labels_command(trained, cells, tmp_path / "whole")
    assert main(whole_command[3:]) == 0
    whole = ad.read_h5ad(tmp_path / "whole" / "predicted_labels.h5ad")
    assert whole.obs["predicted_cell_type"].notna().all() and whole.n_obs == 203

    parts = tmp_path / "resumed" / ".predicted_labels.h5ad.parts"
    kill_after_some_units(predict_labels_command(trained, cells, tmp_path / "resumed"), parts)
    done = len(list(parts.glob("unit-*.npz")))
    resumed = subprocess.run(
        predict_labels_command(trained, cells, tmp_path / "resumed", "--resume"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming: {done} of 26 units were already done" in resumed.stdout
    assert "Predicted: " in resumed.stdout
    assert_same_labels(ad.read_h5ad(tmp_path / "resumed" / "predicted_labels.h5ad"), whole)

    two = subprocess.run(
        predict_labels_command(trained, cells, tmp_path / "two", "--num-gpus", "2"),
        capture_output=True,
        text=True,
        env=os.environ | {"CUDA_VISIBLE_DEVICES": ""},
    )
    assert two.returncode == 0, two.stderr
    assert "(2 processes" in two.stdout
    assert_same_labels(ad.read_h5ad(tmp_path / "two" / "predicted_labels.h5ad"), whole)


def test_model_classify_writes_what_predict_labels_writes(trained, cells, tmp_path):
    """The Python API runs the same task in memory; an AnnData gets the command's columns, arrays and classes.

    The head runs on a unit's embeddings at once, and units of other sizes round differently (by 1e-7).
    """
    assert main(predict_labels_command(trained, cells, tmp_path)[3:]) == 0
    written = ad.read_h5ad(tmp_path / "predicted_labels.h5ad")
    adata = ad.read_h5ad(cells)
    probabilities = transcriptformer.load(DEMO, device="cpu", adapter=trained[0]).classify(adata, batch_size=8)
    np.testing.assert_allclose(probabilities.to_numpy(), written.obsm["cell_type_probabilities"], rtol=1e-5)
    assert list(probabilities.columns) == list(written.uns["cell_type_probabilities"]["classes"])
    assert probabilities.index.equals(adata.obs_names)
    pd.testing.assert_series_equal(adata.obs["predicted_cell_type"], written.obs["predicted_cell_type"])
    np.testing.assert_allclose(
        adata.obs["predicted_cell_type_probability"], written.obs["predicted_cell_type_probability"], rtol=1e-5
    )
    np.testing.assert_allclose(
        adata.obsm["cell_type_probabilities"], written.obsm["cell_type_probabilities"], rtol=1e-5
    )
