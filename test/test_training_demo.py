"""The bundled demo model (models/demo-mouse-brain) on its 100 held-out mouse brain cells (never trained on)."""

from pathlib import Path

import numpy as np
import pytest

import transcriptformer
from transcriptformer.data.tokenize import read_anndata
from transcriptformer.training.baseline import mean_rate_count_nll, per_gene_mean_rate
from transcriptformer.training.config import compose_train_config
from transcriptformer.training.objective import heldout_count_nll
from transcriptformer.training.scratch import new_checkpoint

REPO = Path(__file__).parent.parent
DEMO = REPO / "models" / "demo-mouse-brain"
HELDOUT = REPO / "test" / "data" / "demo_mouse_brain_heldout.h5ad"


@pytest.fixture(scope="module")
def demo():
    return transcriptformer.load(DEMO, device="cpu")


@pytest.fixture(scope="module")
def heldout_batches(demo):
    cells = demo.tokenize(HELDOUT)
    return [cells.batch(np.arange(start, min(start + 25, len(cells)))) for start in range(0, len(cells), 25)]


def test_demo_model_is_small_and_loads_for_inference(demo):
    assert sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file()) < 10 * 2**20
    result = demo.predict(HELDOUT, batch_size=32, output_keys=("embeddings", "llh"))
    assert result["embeddings"].shape == (100, 128)
    assert np.isfinite(result["llh"]).all() and np.isfinite(result["embeddings"]).all()


@pytest.mark.slow  # 22 s on two busy cores
def test_demo_model_beats_its_initialisation_and_per_gene_rates_on_heldout_cells(demo, heldout_batches):
    trained = heldout_count_nll(demo.model, heldout_batches)
    # The exact initialisation the recorded training run started from (conf/demo.yaml, seeded).
    gene_table = DEMO / "vocabs" / "mus_musculus_gene.h5"
    cfg = compose_train_config(REPO / "conf" / "demo.yaml", [f"data_config.esm2_mappings=[{gene_table}]"])
    untrained = new_checkpoint(cfg, [read_anndata(HELDOUT)])
    assert untrained.gene_vocab.index == demo.checkpoint.gene_vocab.index
    assert trained < heldout_count_nll(untrained.model, heldout_batches) - 1.0
    # Per-gene rates fitted on these very cells: an oracle that has seen the answers, and is still worse.
    pad = demo.model.special_tokens.pad
    rates = per_gene_mean_rate(heldout_batches, len(demo.checkpoint.gene_vocab), pad)
    assert trained < mean_rate_count_nll(heldout_batches, rates, demo.model) - 0.02
