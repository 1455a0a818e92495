"""LoRA fine-tuning on the reference checkpoint with 64 real mouse brain cells."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import transcriptformer
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.data.tokenize import Batch
from transcriptformer.model.lora import (
    ADAPTER_WEIGHTS_FILE,
    add_lora_adapters,
    load_adapters,
    resolve_target_modules,
    save_adapters,
)
from transcriptformer.training.config import FinetuneConfig, LoraConfig, OptimConfig, TrainDataConfig, TrainerConfig
from transcriptformer.training.objective import training_loss
from transcriptformer.training.run import merge_adapters_into_checkpoint, run_finetuning

OUTPUTS = ("embeddings", "llh", "gene_llh", "mu")


def finetune_config(reference_dir, reference_input, output, **trainer):
    return FinetuneConfig(
        checkpoint_path=str(reference_dir),
        output_path=str(output),
        data=TrainDataConfig(train_files=[str(reference_input)], batch_size=8),
        optim=OptimConfig(lr=1e-2),
        trainer=TrainerConfig(device="cpu", log_every_n_steps=1, **trainer),
        lora=LoraConfig(r=4, alpha=16, dropout=0.1),
    )


def first_cells(reference_model, reference_input, n=16) -> Batch:
    return reference_model.tokenize(reference_input).batch(np.arange(n))


def eval_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return float(training_loss(model, batch).loss)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, reference_dir, reference_input):
    """Adapters trained for 12 steps, and the base weights before training."""
    before = {k: v.clone() for k, v in load_checkpoint(reference_dir).model.state_dict().items()}
    output = tmp_path_factory.mktemp("finetune") / "adapters"
    path = run_finetuning(finetune_config(reference_dir, reference_input, output, max_steps=12))
    return path, before


def test_only_adapters_require_grad(reference_dir):
    model = add_lora_adapters(load_checkpoint(reference_dir).model, LoraConfig(r=4))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    # 2 layers x (4 attention projections + 2 FFN linears) x (A, B)
    assert len(trainable) == 2 * 6 * 2
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert {p.shape for name, p in model.named_parameters() if ".lora_A." in name} == {(4, 64), (4, 128)}


def test_train_heads_makes_head_copies_trainable(reference_dir):
    model = add_lora_adapters(load_checkpoint(reference_dir).model, LoraConfig(r=4, train_heads=True))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    heads = {name for name in trainable if ".lora_" not in name}
    assert heads and all(".mu." in n or ".gene_id_head." in n for n in heads)
    assert all("modules_to_save" in name for name in heads)


def test_target_module_aliases_and_errors(reference_dir):
    model = load_checkpoint(reference_dir).model
    assert resolve_target_modules(model, ["q", "v"]) == ["self_attn.linears.0", "self_attn.linears.2"]
    assert resolve_target_modules(model, ["ffn", "linear1"]) == ["linear1", "linear2"]
    with pytest.raises(ValueError, match="'qkv' matches no linear layer"):
        resolve_target_modules(model, ["qkv"])


def test_fresh_adapters_leave_outputs_unchanged(reference_dir, reference_input, expected):
    checkpoint = load_checkpoint(reference_dir)
    adapted = add_lora_adapters(checkpoint.model, LoraConfig(r=4, train_heads=True))
    batch = transcriptformer.load(reference_dir, device="cpu").tokenize(reference_input).batch(np.arange(64))
    result = adapted.eval().predict(batch.gene_tokens, batch.gene_counts, batch.aux_tokens, OUTPUTS)
    for key in OUTPUTS:
        np.testing.assert_allclose(result[key].numpy(), expected[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_training_lowers_loss_and_keeps_base_weights(trained, reference_dir, reference_model, reference_input):
    path, before = trained
    batch = first_cells(reference_model, reference_input)
    base_loss = eval_loss(load_checkpoint(reference_dir).model, batch)
    adapted = load_adapters(load_checkpoint(reference_dir).model, path, merge=False)
    assert eval_loss(adapted.get_base_model(), batch) < base_loss - 0.05
    # The base weights inside the adapted model are the checkpoint's, untouched by training.
    base_state = {k.replace(".base_layer", ""): v for k, v in adapted.get_base_model().state_dict().items()}
    for key, value in before.items():
        torch.testing.assert_close(base_state[key], value, rtol=0, atol=0, msg=key)
    adapter_weights = load_file(path / ADAPTER_WEIGHTS_FILE)
    assert all("lora_" in key for key in adapter_weights)
    assert any(key.endswith("lora_B.weight") and value.abs().max() > 0 for key, value in adapter_weights.items())


def test_saved_and_merged_adapters_reproduce_adapted_outputs(
    trained, tmp_path, reference_dir, reference_model, reference_input
):
    path, _ = trained
    batch = first_cells(reference_model, reference_input)
    adapted = load_adapters(load_checkpoint(reference_dir).model, path, merge=False).eval()
    want = adapted.predict(batch.gene_tokens, batch.gene_counts, batch.aux_tokens, OUTPUTS)

    merged = load_adapters(load_checkpoint(reference_dir).model, path, merge=True).eval()
    assert type(merged).__name__ == "TranscriptFormer"
    got = merged.predict(batch.gene_tokens, batch.gene_counts, batch.aux_tokens, OUTPUTS)

    merged_dir = merge_adapters_into_checkpoint(reference_dir, path, tmp_path / "merged")
    reloaded = transcriptformer.load(merged_dir, device="cpu")
    from_disk = reloaded.model.predict(batch.gene_tokens, batch.gene_counts, batch.aux_tokens, OUTPUTS)
    for key in OUTPUTS:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
        torch.testing.assert_close(from_disk[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    reference = reference_model.model.predict(batch.gene_tokens, batch.gene_counts, batch.aux_tokens, OUTPUTS)
    assert not torch.allclose(from_disk["llh"], reference["llh"])


def test_adapter_files_are_protected(trained, tmp_path, reference_dir):
    path, _ = trained
    model = add_lora_adapters(load_checkpoint(reference_dir).model, LoraConfig(r=4))
    with pytest.raises(FileExistsError, match="already holds adapters"):
        save_adapters(model, path)
    with pytest.raises(FileNotFoundError, match="is not an adapter directory"):
        load_adapters(load_checkpoint(reference_dir).model, tmp_path)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        merge_adapters_into_checkpoint(reference_dir, path, reference_dir)
