"""How much padding a batch may hold: the forward passes of real cells under plans of several ``max_padding``.

Builds the random-weight checkpoint of ``bench_inference.py`` (``mid`` by default: 6 layers, 512 wide) whose
vocabulary holds the genes of the first ``--cells`` real human cells, tokenizes them as ``transcriptformer inference``
does, and runs every cell through the model under the batch plan of each ``max_padding``
(:func:`transcriptformer.data.batching.plan_batches`, ``--batch-size`` cells at most), in this process, fp32, on the
CPU. Plans alternate, ``--repeats`` times each. Prints the cells of each batch, the positions computed and the share
of them that is padding, the CPU time (user + system of this process) and wall time of the best repeat, and the
largest difference of the embeddings from the plan without a limit (``max_padding`` 1).

Examples::

    OMP_NUM_THREADS=1 python benchmarks/batch_padding.py --cells 16
    python benchmarks/batch_padding.py --cells 64 --max-padding 1 0.05 0
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.data.batching import plan_batches

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import DEFAULT_DATA, build_checkpoint, gene_ids_of  # noqa: E402


def run_plan(model, cells, plan) -> tuple[float, float, np.ndarray]:
    """CPU seconds, wall seconds and the ``(n_cells, E)`` embeddings of running ``cells`` batch by batch."""
    embeddings = np.zeros((len(cells), model.model_config.embed_dim), dtype=np.float32)
    started, cpu = time.perf_counter(), time.process_time()
    for batch in plan:
        inputs = cells.batch(batch.rows, batch.length)
        out = model.predict(inputs.gene_tokens, inputs.gene_counts, inputs.aux_tokens, ["embeddings"])
        embeddings[batch.rows] = out["embeddings"].numpy()
    return time.process_time() - cpu, time.perf_counter() - started, embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="real cells with raw counts, var['ensembl_id']")
    parser.add_argument("--cells", type=int, default=16)
    parser.add_argument("--size", default="mid")
    parser.add_argument("--seq-len", type=int, default=2047)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-padding", type=float, nargs="+", default=[1.0, 0.3, 0.2, 0.1, 0.05, 0.0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        adata = ad.read_h5ad(args.data)[: args.cells].copy()
        checkpoint = load_checkpoint(build_checkpoint(args.size, gene_ids_of(adata), Path(tmp), args.seq_len))
        cells = checkpoint.tokenizer(remove_duplicate_genes=True, gene_col_name="ensembl_id").tokenize(adata)
    n_tokens = cells.n_tokens()
    plans = {
        x: plan_batches(n_tokens, cells.seq_len, batch_size=args.batch_size, max_padding=x) for x in args.max_padding
    }
    best: dict[float, tuple[float, float]] = {}
    embeddings: dict[float, np.ndarray] = {}
    for _ in range(args.repeats):
        for x, plan in plans.items():
            cpu, wall, embeddings[x] = run_plan(checkpoint.model, cells, plan)
            best[x] = min(best.get(x, (cpu, wall)), (cpu, wall))

    useful = int(np.minimum(n_tokens + 1, cells.seq_len).sum())
    reference = embeddings.get(1.0, next(iter(embeddings.values())))
    print(
        f"{len(cells)} cells ({args.size}, fp32, CPU, {torch.get_num_threads()} threads), genes per cell: "
        f"{', '.join(map(str, sorted(n_tokens.tolist(), reverse=True)))}"
    )
    print(f"load average after the runs: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"{'max_padding':>11}  {'cells per batch':<28} {'positions':>9} {'padding':>7} {'CPU s':>6} {'wall s':>6} "
        f"{'max diff':>8}"
    )
    for x, plan in plans.items():
        positions = sum(len(batch.rows) * batch.length for batch in plan)
        sizes = " ".join(str(len(batch.rows)) for batch in plan)
        diff = np.abs(embeddings[x] - reference).max() / np.abs(reference).max()
        cpu, wall = best[x]
        print(
            f"{x:>11}  {sizes:<28} {positions:>9} {1 - useful / positions:>7.0%} {cpu:>6.2f} {wall:>6.2f} {diff:>8.1e}"
        )


if __name__ == "__main__":
    main()
