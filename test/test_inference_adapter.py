"""LoRA adapters applied at inference: ``transcriptformer inference --adapter`` and ``load(adapter=...)``."""

import anndata as ad
import numpy as np
import pytest
import torch

import transcriptformer
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.cli import main
from transcriptformer.model.lora import add_lora_adapters, save_adapters
from transcriptformer.training.config import LoraConfig


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, reference_dir):
    """Adapters whose update is not zero (fresh adapters are an exact identity)."""
    torch.manual_seed(0)
    model = add_lora_adapters(load_checkpoint(reference_dir).model, LoraConfig(r=4), str(reference_dir))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return save_adapters(model, tmp_path_factory.mktemp("adapters") / "adapter")


def test_adapters_change_outputs_the_same_way_in_cli_and_api(
    reference_dir, reference_input, adapter, expected, tmp_path
):
    adapted = transcriptformer.load(reference_dir, device="cpu", adapter=adapter).predict(
        reference_input, output_keys=("embeddings", "llh")
    )
    assert np.abs(adapted["embeddings"] - expected["embeddings"]).max() > 1e-3  # the adapters do something

    args = ["inference", "--checkpoint-path", str(reference_dir), "--data-file", str(reference_input)]
    assert (
        main([*args, "--output-path", str(tmp_path), "--adapter", str(adapter), "--output-keys", "embeddings", "llh"])
        == 0
    )
    written = ad.read_h5ad(tmp_path / "embeddings.h5ad")
    np.testing.assert_allclose(written.obsm["X_transcriptformer"], adapted["embeddings"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(written.obs["llh"], adapted["llh"], rtol=1e-5)
    assert written.uns["transcriptformer"]["adapter"] == str(adapter.resolve())


def test_missing_adapter_is_a_clear_error(reference_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not an adapter directory"):
        transcriptformer.load(reference_dir, device="cpu", adapter=tmp_path)
