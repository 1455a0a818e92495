"""Training on a CUDA GPU: FlexAttention gradients, mixed precision. Skipped where there is no GPU."""

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.model.lora import ADAPTER_WEIGHTS_FILE
from transcriptformer.training.config import FinetuneConfig, LoraConfig, OptimConfig, TrainDataConfig, TrainerConfig
from transcriptformer.training.objective import training_loss
from transcriptformer.training.run import run_finetuning

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_flex_attention_gives_the_chunked_loss_and_gradients(reference_dir, reference_model, reference_input):
    batch = reference_model.tokenize(reference_input).batch(np.arange(16)).to("cuda")
    results = {}
    for backend in ("flex", "chunked"):
        model = load_checkpoint(reference_dir, device="cuda", attention_backend=backend).model.eval()
        loss = training_loss(model, batch).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results[backend] = (loss.detach(), grads)
    (flex_loss, flex_grads), (chunked_loss, chunked_grads) = results["flex"], results["chunked"]
    torch.testing.assert_close(flex_loss, chunked_loss, rtol=1e-5, atol=1e-5)
    for name, grad in chunked_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_finetune_on_gpu_in_mixed_precision(reference_dir, reference_input, tmp_path, precision):
    config = FinetuneConfig(
        checkpoint_path=str(reference_dir),
        output_path=str(tmp_path / "adapters"),
        data=TrainDataConfig(train_files=[str(reference_input)], batch_size=8),
        optim=OptimConfig(lr=1e-2),
        trainer=TrainerConfig(device="1", precision=precision, max_epochs=2, log_every_n_steps=1),
        lora=LoraConfig(r=4),
    )
    path = run_finetuning(config)
    weights = load_file(path / ADAPTER_WEIGHTS_FILE)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    losses = pd.read_csv(path / "training_run" / "metrics.csv")["train/loss_step"].dropna().to_numpy()
    assert len(losses) == 16 and np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
