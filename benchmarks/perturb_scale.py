"""One in-silico perturbation job at scale: 100 perturbations of 1,000 real cells with the demo model.

Knock-outs of the 50 genes with the most counts in the cells, and over-expressions (to each cell's highest count)
of the next 50, through ``TranscriptFormerModel.perturb``. Prints the job's time, the (perturbation, cell) pairs
affected and run against those skipped, the model inputs per second, the peak memory and the load of the machine.

    python benchmarks/perturb_scale.py                      # CPU, batch size 64
    python benchmarks/perturb_scale.py --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import anndata as ad
import numpy as np
import torch

import transcriptformer

DATA = "test/data/mouse_brain_1k.h5ad"
CHECKPOINT = "models/demo-mouse-brain"


def most_counted_genes(path: str, model: transcriptformer.TranscriptFormerModel, n: int) -> list[str]:
    """Ids of the ``n`` genes of the vocabulary with the most counts in the cells of ``path``."""
    cells = ad.read_h5ad(path)
    totals = np.asarray(cells.X.sum(axis=0)).ravel()
    ids = cells.var["ensembl_id"].to_numpy()
    in_vocab = np.array([gene in model.checkpoint.gene_vocab for gene in ids])
    order = np.argsort(-np.where(in_vocab, totals, -1), kind="stable")
    return [str(gene) for gene in ids[order[:n]]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--checkpoint", default=CHECKPOINT)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--knock-outs", type=int, default=50)
    parser.add_argument("--over-expressions", type=int, default=50)
    args = parser.parse_args()

    model = transcriptformer.load(args.checkpoint, device=args.device)
    genes = most_counted_genes(args.data, model, args.knock_outs + args.over_expressions)
    knock_out, over_express = genes[: args.knock_outs], genes[args.knock_outs :]
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = model.perturb(args.data, knock_out, over_express, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    load_after = os.getloadavg()

    obs = result.cells.obs
    affected = int(obs["affected"].sum())
    n_cells = result.cells.n_obs // len(result.summary)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    print(f"{len(result.summary)} perturbations ({len(knock_out)} knock-outs, {len(over_express)} over-expressions)")
    print(f"x {n_cells} cells = {len(obs):,} (perturbation, cell) pairs on {args.device}, batch size {args.batch_size}")
    print(f"affected and run: {affected:,}; unaffected, skipped: {len(obs) - affected:,}")
    print(f"model inputs run: {result.inputs_run:,} (the affected pairs and {result.inputs_run - affected} cells)")
    print(f"job time: {seconds:.1f} s, {result.inputs_run / seconds:.1f} inputs/s, {len(obs) / seconds:.1f} pairs/s")
    print(f"process CPU time: {cpu:.0f} s; peak RSS: {peak:.0f} MiB; torch threads {torch.get_num_threads()}")
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {load_after}")
    print(f"genes.csv rows: {len(result.genes)}; X entries: {result.cells.X.nnz:,}")


if __name__ == "__main__":
    main()
