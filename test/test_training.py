"""Training objective, data pipeline, settings and pretraining from scratch, on 64 real mouse brain cells."""

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

import transcriptformer
from conftest import REFERENCE_INPUT, TRAIN_CONFIG, tiny_train_overrides
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.data.batching import batch_length
from transcriptformer.data.tokenize import read_anndata
from transcriptformer.model.likelihood import masked_mean
from transcriptformer.model.lora import ADAPTER_WEIGHTS_FILE
from transcriptformer.training.config import (
    FinetuneConfig,
    LoraConfig,
    OptimConfig,
    TrainDataConfig,
    TrainerConfig,
    compose_train_config,
)
from transcriptformer.training.datamodule import CellDataset, EpochShuffleSampler, collate_cells, split_rows
from transcriptformer.training.module import warmup_cosine
from transcriptformer.training.objective import training_loss
from transcriptformer.training.run import run_finetuning, run_pretraining
from transcriptformer.training.scratch import aux_vocabs_from_obs, build_gene_table, new_checkpoint
from transcriptformer.training.trainer import Hardware, resolve_hardware

REPO = Path(__file__).parent.parent
GENE_TABLE = REPO / "test/data/reference_tiny/vocabs/mus_musculus_gene.h5"


@pytest.fixture(scope="module")
def cells(reference_model, reference_input):
    return reference_model.tokenize(reference_input)


def tiny_train_config(reference_input, output: Path, *overrides: str):
    assert reference_input == REFERENCE_INPUT
    return compose_train_config(TRAIN_CONFIG, tiny_train_overrides(output, *overrides))


def test_loss_is_count_nll_plus_weighted_gene_nll_in_training_mode(reference_dir, cells):
    model = load_checkpoint(reference_dir).model.eval()
    batch = cells.batch(np.arange(8))
    terms = training_loss(model, batch)
    out = model(batch.gene_tokens, batch.gene_counts, batch.aux_tokens, embed_mode=False)
    scores = model.likelihoods(out, batch.gene_tokens, batch.gene_counts)
    mask = scores["mask"]
    assert terms.n_tokens == int(mask.sum()) > 0
    torch.testing.assert_close(terms.count_nll, scores["count_nll"][mask].mean())
    torch.testing.assert_close(terms.gene_nll, scores["gene_nll"][mask].mean())
    torch.testing.assert_close(terms.loss, terms.count_nll + terms.gene_nll)
    # Training mode has no count bias on the attention diagonal, unlike the inference (embed) mode.
    inference = model.predict(batch.gene_tokens, batch.gene_counts, batch.aux_tokens, output_keys=("llh",))["llh"]
    assert not torch.allclose(masked_mean(scores["count_nll"], mask), inference)

    model.loss_config.gene_id_loss_weight = 0.25
    torch.testing.assert_close(training_loss(model, batch).loss, terms.count_nll + 0.25 * terms.gene_nll)


def test_dropout_is_on_in_train_mode_only(reference_dir, cells):
    model = load_checkpoint(reference_dir).model
    batch = cells.batch(np.arange(4))
    model.train()
    assert training_loss(model, batch).loss != training_loss(model, batch).loss
    model.eval()
    assert training_loss(model, batch).loss == training_loss(model, batch).loss


def test_trimmed_batches_give_the_same_loss(reference_dir, cells):
    model = load_checkpoint(reference_dir).model.eval()
    rows = np.arange(40, 48)
    full = cells.batch(rows)
    trimmed = collate_cells([CellDataset(cells, rows)[i] for i in range(len(rows))], cells.pad_index)
    n_genes = (full.gene_tokens != cells.pad_index).sum(1)
    assert (
        trimmed.gene_tokens.shape == (8, batch_length(int(n_genes.max()), cells.seq_len))
        and trimmed.gene_tokens.shape[1] < full.gene_tokens.shape[1]
    )
    torch.testing.assert_close(trimmed.aux_tokens, full.aux_tokens)
    torch.testing.assert_close(training_loss(model, trimmed).loss, training_loss(model, full).loss)


def test_split_and_order_are_seeded(cells):
    train, val = split_rows(64, 0.25, seed=3)
    assert len(val) == 16 and len(train) == 48 and not set(train) & set(val)
    np.testing.assert_array_equal(split_rows(64, 0.25, seed=3)[1], val)
    assert not np.array_equal(split_rows(64, 0.25, seed=4)[1], val)

    lengths = CellDataset(cells, np.arange(64)).lengths()
    assert lengths.max() == cells.seq_len and lengths.min() > 0
    sampler = EpochShuffleSampler(64, seed=0, lengths=lengths, group_size=16)
    first = list(sampler)
    assert sorted(first) == list(range(64)) and list(sampler) == first
    for group in range(4):  # each group of 16 cells is sorted by length, longest first
        assert np.all(np.diff(lengths[first[group * 16 : (group + 1) * 16]]) <= 0)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_warmup_then_cosine_schedule():
    factors = [warmup_cosine(step, warmup_steps=4, total_steps=14, min_ratio=0.1) for step in range(15)]
    np.testing.assert_allclose(factors[:4], [0.25, 0.5, 0.75, 1.0])
    assert factors[4] == 1.0 and all(a > b for a, b in zip(factors[4:14], factors[5:14], strict=False))
    assert factors[14] == pytest.approx(0.1)


def test_hardware_and_precision_settings():
    assert resolve_hardware("cpu").accelerator == resolve_hardware("0").accelerator == "cpu"
    assert resolve_hardware("cpu:2") == Hardware("cpu", 2, "ddp")
    assert resolve_hardware("cpu").first_device == torch.device("cpu")
    assert Hardware("gpu", 2, "ddp").first_device == torch.device("cuda:0")  # the device of a dry run
    with pytest.raises(ValueError, match="device must be 'cpu', 'cpu:N', 'cuda', 'mps', 'auto' or a number"):
        resolve_hardware("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="GPU\\(s\\) asked for, but this machine has 0"):
            resolve_hardware("cuda")  # inference's name of the GPUs
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="device mps needs Apple's GPU"):
            resolve_hardware("mps")
    with pytest.raises(ValueError, match="'cpu:N' needs a number of processes N >= 1"):
        resolve_hardware("cpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="GPU\\(s\\) asked for"):
            resolve_hardware("2")
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainerConfig(precision="64")


def test_hydra_config_composes_groups_and_overrides():
    cfg = compose_train_config(REPO / "conf/demo.yaml", ["optim.lr=5e-4", "model_config=tiny"])
    assert cfg.optim.lr == 5e-4 and cfg.model_config.num_layers == 2 and cfg.model_config.embed_dim == 64
    assert cfg.data_config.aux_cols == ["assay"] and cfg.data.val_fraction == 0.1
    assert cfg.output_path == "models/demo-mouse-brain"
    with pytest.raises(
        ValueError, match="model_config.num_layers=two: Value 'two' of type 'str' could not be"
    ) as error:
        compose_train_config(REPO / "conf/demo.yaml", ["model_config.num_layers=two"])
    assert "\n" not in str(error.value)


def test_former_names_of_settings_still_work_as_overrides():
    """``output_dir=``, ``trainer.devices=`` and ``data.num_workers=`` of existing commands set the renamed fields."""
    former = ["output_dir=out", "trainer.devices=cpu:2", "data.num_workers=3"]
    current = ["output_path=out", "trainer.device=cpu:2", "data.n_data_workers=3"]
    cfg = compose_train_config(REPO / "conf/demo.yaml", former)
    assert cfg == compose_train_config(REPO / "conf/demo.yaml", current)
    assert (cfg.output_path, cfg.trainer.device, cfg.data.n_data_workers) == ("out", "cpu:2", 3)
    with pytest.raises(ValueError, match="data.n_data_workers must be >= 0"):
        compose_train_config(None, ["data.num_workers=-1"])


def test_a_config_file_with_a_former_key_names_the_current_one(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text("defaults:\n  - train_schema\n  - _self_\n\noutput_dir: out\n")
    with pytest.raises(ValueError, match="output_dir.*; output_dir is now output_path"):
        compose_train_config(config)


def test_new_model_tables_and_vocabularies(reference_dir, reference_input, tmp_path):
    adata = read_anndata(reference_input)
    assert aux_vocabs_from_obs([adata], ["assay"]) == {"assay": {"unknown": 0, "MERFISH": 1}}
    cfg = tiny_train_config(reference_input, tmp_path / "model")
    checkpoint = new_checkpoint(cfg, [adata])
    table = build_gene_table(checkpoint.gene_vocab, [GENE_TABLE], seed=0)
    torch.testing.assert_close(checkpoint.model.gene_embeddings.embedding.weight, table)
    assert table.shape == (len(checkpoint.gene_vocab), 32)
    assert checkpoint.gene_vocab.index == load_checkpoint(reference_dir).gene_vocab.index
    # The gene rows are the file's vectors; the special-token rows are uniform in [0, 1).
    special = len(checkpoint.gene_vocab.special_tokens)
    assert table[:special].min() >= 0 and table[:special].max() < 1
    again = new_checkpoint(cfg, [adata]).model.state_dict()
    for key, value in checkpoint.model.state_dict().items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)


def test_pretraining_writes_a_checkpoint_that_inference_loads(reference_input, tmp_path):
    output = tmp_path / "model"
    cfg = tiny_train_config(reference_input, output, "trainer.max_steps=8", "optim.warmup_steps=2")
    assert run_pretraining(cfg) == output
    metrics = (output / "training_run" / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("cells_per_s") and "val/loss" in metrics[0] and len(metrics) > 8

    model = transcriptformer.load(output, device="cpu")
    assert model.checkpoint.aux_vocabs == {"assay": {"unknown": 0, "MERFISH": 1}}
    assert model.checkpoint.config.data_config.esm2_mappings == ["mus_musculus_gene.h5"]
    result = model.predict(reference_input, batch_size=16, output_keys=("embeddings", "llh"))
    assert result["embeddings"].shape == (64, 64) and np.isfinite(result["llh"]).all()
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        run_pretraining(cfg)


def test_pretraining_steps_lower_the_loss(reference_input, tmp_path):
    overrides = ["trainer.max_steps=16", "optim.lr=3e-3", "optim.warmup_steps=0", "data.val_fraction=0"]
    cfg = tiny_train_config(reference_input, tmp_path / "model", *overrides)
    untrained = new_checkpoint(cfg, [read_anndata(reference_input)]).model
    run_pretraining(cfg)
    trained = transcriptformer.load(tmp_path / "model", device="cpu")
    batch = trained.tokenize(reference_input).batch(np.arange(64))
    with torch.no_grad():
        before, after = (float(training_loss(m.eval(), batch).loss) for m in (untrained, trained.model))
    assert after < before - 0.3


class RecordTrainingStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.global_step = trainer.global_step
        self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())


def test_resume_continues_exactly(reference_dir, reference_input, tmp_path, monkeypatch):
    # Both runs on as many CPU threads: the default follows the machine's load, and another count changes sums.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def config(output, **trainer):
        return FinetuneConfig(
            checkpoint_path=str(reference_dir),
            output_path=str(output),
            data=TrainDataConfig(train_files=[str(reference_input)], batch_size=8),
            optim=OptimConfig(lr=1e-2, warmup_steps=2),
            trainer=TrainerConfig(device="cpu", max_steps=6, **trainer),
            lora=LoraConfig(r=4, dropout=0.1),
        )

    straight = run_finetuning(config(tmp_path / "a", checkpoint_every_n_steps=3, keep_checkpoints=-1))
    midway = straight / "training_run" / "checkpoints" / "epoch=0-step=3.ckpt"  # mid-epoch: 8 batches per epoch
    saved = torch.load(midway, map_location="cpu", weights_only=True)
    assert all("lora_" in key for key in saved["state_dict"])  # trainable weights only

    start = RecordTrainingStart()
    resumed = run_finetuning(config(tmp_path / "b", resume=str(midway)), callbacks=[start])
    assert start.global_step == 3
    want = saved["optimizer_states"][0]
    assert start.optimizer_state["param_groups"] == want["param_groups"]
    for index, state in want["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(start.optimizer_state["state"][index][key], value, rtol=0, atol=0)
    final_a, final_b = load_file(straight / ADAPTER_WEIGHTS_FILE), load_file(resumed / ADAPTER_WEIGHTS_FILE)
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=0, atol=0, msg=key)


def test_early_stopping_accumulation_and_bf16_on_cpu(reference_dir, reference_input, tmp_path):
    # lr 1e-30 (lr 0 is refused): steps too small to change the loss, so the validation loss never improves and
    # training stops after 1 + patience validations.
    config = FinetuneConfig(
        checkpoint_path=str(reference_dir),
        output_path=str(tmp_path / "adapters"),
        data=TrainDataConfig(train_files=[str(reference_input)], val_fraction=0.25, batch_size=8),
        optim=OptimConfig(lr=1e-30),
        trainer=TrainerConfig(
            device="cpu",
            precision="bf16-mixed",
            max_epochs=10,
            accumulate_grad_batches=2,
            early_stopping_patience=1,
            log_every_n_steps=1,
        ),
        lora=LoraConfig(r=4),
    )
    path = run_finetuning(config)
    metrics = pd.read_csv(path / "training_run" / "metrics.csv")
    validations = metrics.dropna(subset=["val/loss"])
    assert validations["epoch"].tolist() == [0, 1]
    assert validations["val/loss"].nunique() == 1
    # 48 training cells in batches of 8, two batches per optimizer step: 3 steps per epoch.
    assert validations["step"].tolist() == [2, 5]
