"""Knock-out screens: prefix reuse (model/prefix.py) against the straightforward path, on real cells.

Every expressed gene of each cell in the sequence is knocked out (``--genes-per-cell N``: N of them, evenly
spread over the sequence, which keeps the average position of a knock-out), each variant tokenized as
``perturb`` tokenizes it. Both paths compute the same outputs (``--output-keys``, by default those that
``perturb`` compares) of every (variant, cell) pair:

* straightforward: the variants in length-aware batches within ``--max-tokens`` positions, ``predict`` on each;
* prefix reuse: :func:`~transcriptformer.model.prefix.predict_variants` on the cells and all their variants.

Prints pairs/s of each path, the speed-up, the largest difference between the two paths' outputs (relative to
each output's largest value) and the peak RSS (``--paths`` runs one path per process, so that each gets its own).

Sizes: ``demo`` (models/demo-mouse-brain on the bundled held-out mouse brain cells), ``mid`` (a random-weight
checkpoint of 6 layers x 512, seq_len 2047, built as benchmarks/bench_inference.py builds it, on full-transcriptome
human cells, cut at seq_len) and ``sapiens`` (the same at TF-Sapiens' shape: 12 layers x 2048, its vocabulary size;
for a GPU).

Examples::

    python benchmarks/prefix_reuse.py --size demo --cells 20
    python benchmarks/prefix_reuse.py --size mid --cells 1 --genes-per-cell 32
    python benchmarks/prefix_reuse.py --size mid --cells 8 --genes-per-cell 256 --device cuda
    python benchmarks/prefix_reuse.py --size sapiens --cells 8 --genes-per-cell 256 --device cuda  # the GPU check
"""

import argparse
import dataclasses
import resource
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from bench_inference import DEFAULT_DATA, build_checkpoint, gene_ids_of, synchronize

import transcriptformer
from transcriptformer.data.batching import plan_batches
from transcriptformer.model.outputs import OUTPUTS, PERTURBATION_KEYS
from transcriptformer.model.prefix import DEFAULT_MAX_TOKENS, predict_variants

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "models" / "demo-mouse-brain"
HELDOUT = REPO / "test" / "data" / "demo_mouse_brain_heldout.h5ad"
PATHS = ("prefix", "straightforward")


def knock_outs(cells, rows: np.ndarray, genes_per_cell: int | None):
    """The cells ``rows`` and one variant per knocked-out gene of each (genes in its sequence)."""
    variants, cell_of = [], []
    for index, row in enumerate(rows):
        columns, _ = cells.sequence(row)
        if genes_per_cell is not None and genes_per_cell < len(columns):
            columns = columns[np.linspace(0, len(columns) - 1, genes_per_cell).round().astype(int)]
        dense = np.repeat(cells.counts[row].toarray(), len(columns), axis=0)
        dense[np.arange(len(columns)), columns] = 0
        variants.append(sp.csr_matrix(dense))
        cell_of += [index] * len(columns)
    cell_of = np.array(cell_of)
    variant_cells = dataclasses.replace(
        cells,
        counts=sp.vstack(variants, format="csr"),
        aux_tokens=cells.aux_tokens[rows][cell_of],
        obs_names=pd.Index(np.asarray(cells.obs_names)[rows][cell_of]),
    )
    return variant_cells, cell_of


def straightforward(net, variants, aux, keys, max_tokens, device) -> dict[str, np.ndarray]:
    """``predict`` on length-aware batches of the variants; outputs in variant order, per position at seq_len."""
    results = {}
    for batch in plan_batches(variants.n_tokens(), net.seq_len, max_tokens=max_tokens):
        inputs = variants.batch(batch.rows, batch.length).to(device)
        out = net.predict(inputs.gene_tokens, inputs.gene_counts, aux[batch.rows].to(device), keys)
        for key, value in out.items():
            value = value.cpu().numpy()
            if OUTPUTS[key].level == "cell":
                results.setdefault(key, np.zeros((len(variants), *value.shape[1:]), "f4"))[batch.rows] = value
            else:
                shape = (len(variants), net.seq_len, *value.shape[2:])
                results.setdefault(key, np.zeros(shape, "f4"))[batch.rows, : batch.length] = value
    return results


def with_prefix_reuse(net, cells, rows, variants, cell_of, keys, args, device) -> dict[str, np.ndarray]:
    """:func:`predict_variants` on ``args.cells_per_call`` cells and their variants at a time (seq_len positions)."""
    results = {}
    for first in range(0, len(rows), args.cells_per_call):
        chunk = np.arange(first, min(first + args.cells_per_call, len(rows)))
        chunk_variants = np.flatnonzero(np.isin(cell_of, chunk))
        cell_batch = cells.batch(rows[chunk], net.seq_len).to(device)
        variant_batch = variants.batch(chunk_variants, net.seq_len).to(device)
        out = predict_variants(
            net,
            cell_batch.gene_tokens,
            cell_batch.gene_counts,
            cell_batch.aux_tokens,
            variant_batch.gene_tokens,
            variant_batch.gene_counts,
            torch.from_numpy(cell_of[chunk_variants] - first).to(device),
            keys,
            max_tokens=args.max_tokens,
        )
        for key, value in out.items():
            results.setdefault(key, np.zeros((len(variants), *value.shape[1:]), "f4"))[chunk_variants] = value.cpu()
    return results


def warm_up(net, cells, rows, variants, cell_of, keys, device) -> None:
    """Run both paths once on a few variants of the first cell (on CUDA, the straightforward path compiles)."""
    first = np.flatnonzero(cell_of == 0)[:4]
    cell_batch = cells.batch(rows[:1], net.seq_len).to(device)
    variant_batch = variants.batch(first, net.seq_len).to(device)
    cell_of = torch.zeros(len(first), dtype=torch.long, device=device)
    tokens, counts, aux = variant_batch.gene_tokens, variant_batch.gene_counts, cell_batch.aux_tokens
    predict_variants(net, cell_batch.gene_tokens, cell_batch.gene_counts, aux, tokens, counts, cell_of, keys)
    net.predict(tokens, counts, aux[cell_of], keys)


def timed(function, device) -> tuple[float, float, dict[str, np.ndarray]]:
    """Wall-clock and CPU seconds of ``function()``, and its result."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, result


def load(args, device):
    """The model and the tokenized cells of ``args.size``."""
    if args.size == "demo":
        model = transcriptformer.load(DEMO_MODEL, device=device)
        return model, model.tokenize(HELDOUT, drop_empty_cells=True)
    adata = ad.read_h5ad(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(args.size, gene_ids_of(adata), Path(tmp), args.seq_len)
        model = transcriptformer.load(path, device=device)
    return model, model.tokenize(adata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("demo", "mid", "sapiens"), default="demo")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="h5ad of the random-weight sizes' cells")
    parser.add_argument("--seq-len", type=int, default=2047, help="of the random-weight sizes")
    parser.add_argument("--cells", type=int, default=20, help="cells screened (the first ones)")
    parser.add_argument("--genes-per-cell", type=int, default=None, help="knock-outs per cell (default: all)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="positions per batch, both paths")
    parser.add_argument("--output-keys", nargs="+", default=list(PERTURBATION_KEYS))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="run in this order")
    parser.add_argument("--cells-per-call", type=int, default=16, help="cells per predict_variants call")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model, cells = load(args, device)
    net, keys = model.model, tuple(args.output_keys)
    config = net.model_config
    rows = np.arange(min(args.cells, len(cells)))
    variants, cell_of = knock_outs(cells, rows, args.genes_per_cell)
    aux = torch.from_numpy(cells.aux_tokens[rows][cell_of])
    lengths = cells.n_tokens()[rows]
    print(
        f"{args.size}: {config.num_layers} layers x {config.embed_dim} wide, seq_len {config.seq_len}, vocab "
        f"{net.gene_embeddings.embedding.weight.shape[0]}; {len(rows)} cells of {lengths.min()}-{lengths.max()} "
        f"genes (median {int(np.median(lengths))}), {len(variants)} knock-outs; outputs {', '.join(keys)}; "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, max_tokens {args.max_tokens}"
    )
    paths = {
        "prefix": lambda: with_prefix_reuse(net, cells, rows, variants, cell_of, keys, args, device),
        "straightforward": lambda: straightforward(net, variants, aux, keys, args.max_tokens, device),
    }
    warm_up(net, cells, rows, variants, cell_of, keys, device)
    seconds, cpu_seconds, results = {}, {}, {}
    for name in args.paths:
        seconds[name], cpu_seconds[name], results[name] = timed(paths[name], device)
        print(
            f"{name}: {seconds[name]:.2f} s ({cpu_seconds[name]:.2f} s CPU), {len(variants) / seconds[name]:.1f} "
            f"pairs/s; peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
        )
    if len(seconds) == 2:
        print(
            f"speed-up {seconds['straightforward'] / seconds['prefix']:.2f}x wall-clock, "
            f"{cpu_seconds['straightforward'] / cpu_seconds['prefix']:.2f}x CPU time"
        )
        for key in keys:
            got, want = results["prefix"][key], results["straightforward"][key]
            difference = np.abs(got - want).max() / np.abs(want).max()
            print(f"  {key}: largest difference {difference:.1e} (relative to the largest value)")


if __name__ == "__main__":
    main()
