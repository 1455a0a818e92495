"""Seconds per LoRA training step (forward, backward, AdamW step) on a batch of 4 real cells.

Two models, each with rank-4 adapters on the attention projections and the FFN (the ``finetune`` defaults):

* ``fixture``: the reference checkpoint (test/data/reference_tiny: 2 layers, width 64, 127 genes) on the 4 of
  its 64 mouse brain cells with the most genes;
* ``mid``: a random-weight model of conf/model/mid.yaml (6 layers, width 512, 2047 genes, gene-embedding width
  2560) whose vocabulary holds the ~19,000 genes of ``--cells``, on the 4 cells with the most genes there
  (every position filled: 4 x 2047 tokens).

Batches are built as training builds them (trimmed to the longest cell).

Examples::

    python benchmarks/bench_lora_step.py
    python benchmarks/bench_lora_step.py --models mid --device cuda --precision bf16-mixed
"""

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from transcriptformer.checkpoint import Checkpoint, load_checkpoint
from transcriptformer.data.tokenize import Batch, TokenizedCells, read_anndata
from transcriptformer.data.vocab import write_embedding_table
from transcriptformer.model.lora import LoraConfig, add_lora_adapters
from transcriptformer.training.config import compose_train_config
from transcriptformer.training.datamodule import CellDataset, collate_cells
from transcriptformer.training.module import parameter_groups
from transcriptformer.training.objective import training_loss
from transcriptformer.training.scratch import new_checkpoint

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "test" / "data" / "reference_tiny"
DEFAULT_CELLS = REPO.parent / "shared" / "data" / "human_fulltranscriptome_559.h5ad"
ESM_WIDTH = 2560


def tokenize(checkpoint: Checkpoint, data: Path | ad.AnnData) -> TokenizedCells:
    return checkpoint.tokenizer().tokenize(data)


def longest_cells_batch(cells: TokenizedCells, n: int = 4) -> Batch:
    """The ``n`` cells with the most genes, batched as training batches them."""
    rows = np.argsort(-(cells.counts > 0).getnnz(axis=1), kind="stable")[:n]
    dataset = CellDataset(cells, rows)
    return collate_cells([dataset[i] for i in range(len(rows))], cells.pad_index)


def fixture_case() -> tuple[Checkpoint, Batch]:
    checkpoint = load_checkpoint(REFERENCE)
    cells = tokenize(checkpoint, REFERENCE / "input.h5ad")
    return checkpoint, longest_cells_batch(cells)


def mid_case(cells_path: Path, workdir: Path) -> tuple[Checkpoint, Batch]:
    adata = read_anndata(cells_path)
    adata = adata[:, adata.var["ensembl_id"].notna().to_numpy()].copy()  # genes without an Ensembl id carry NaN
    gene_ids = list(dict.fromkeys(adata.var["ensembl_id"].astype(str)))
    table_file = workdir / "homo_sapiens_gene.h5"
    rng = np.random.default_rng(0)
    write_embedding_table(table_file, {gene: rng.standard_normal(ESM_WIDTH, dtype=np.float32) for gene in gene_ids})
    overrides = ["model_config=mid", f"data_config.esm2_mappings=[{table_file}]", f"output_path={workdir / 'mid'}"]
    checkpoint = new_checkpoint(compose_train_config(REPO / "conf" / "train.yaml", overrides), [adata])
    return checkpoint, longest_cells_batch(tokenize(checkpoint, adata))


def time_lora_steps(
    checkpoint: Checkpoint, batch: Batch, device: torch.device, precision: str, steps: int, warmup: int
) -> tuple[list[float], int, int]:
    """Seconds of each timed step, trainable and total parameter counts."""
    model = add_lora_adapters(checkpoint.model, LoraConfig(r=4, alpha=16, dropout=0.05)).to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-4)
    batch = batch.to(device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    )
    times = []
    for step in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = training_loss(model.get_base_model(), batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return times, trainable, sum(p.numel() for p in model.parameters())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("fixture", "mid"), default=["fixture", "mid"])
    parser.add_argument("--cells", type=Path, default=DEFAULT_CELLS, help="h5ad with long cells for 'mid'")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default="32")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, caches)")
    args = parser.parse_args()
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    print(f"device {device} ({threads} CPU threads), precision {args.precision}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            checkpoint, batch = fixture_case() if name == "fixture" else mid_case(args.cells, Path(workdir))
            times, trainable, total = time_lora_steps(
                checkpoint, batch, device, args.precision, args.steps, args.warmup
            )
            cfg = checkpoint.config.model_config
            print(
                f"{name:8s} {cfg.num_layers} layers, width {cfg.embed_dim}, vocab {len(checkpoint.gene_vocab)}, "
                f"batch {tuple(batch.gene_tokens.shape)}, LoRA params {trainable:,} of {total:,}: "
                f"{statistics.median(times):.3f} s/step (median of {len(times)}, min {min(times):.3f})"
            )


if __name__ == "__main__":
    main()
