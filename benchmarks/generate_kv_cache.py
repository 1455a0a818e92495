"""Generation with and without the key/value cache: time per cell, speed-up and identical samples.

A model of the demo's width (4 layers, 4 heads, 128 wide; random weights, seeded) but of sequence length 2,047
generates ``--cells`` cells of 511 and 2,047 genes, decoding with the cache (one query per layer and gene) and
without it (a forward pass over the whole sequence at every gene). ``[END]`` is never drawn, so every cell has
the full length. Both draw the same random numbers: the script checks that they give the same cells.

Lengths above ``--full-uncached-up-to`` are too slow to generate uncached on a CPU; there the uncached time is
the sum, over all positions, of one forward pass over the sequence so far, timed at ``--timed-steps`` evenly
spaced positions (on the cached run's cells) and interpolated. It leaves out the sampling that each step adds, so
the speed-up printed is a lower bound.

Usage: ``python benchmarks/generate_kv_cache.py [--cells 4] [--lengths 511 2047] [--layers 4 --width 128]``
"""

import argparse
import time

import numpy as np
import torch

from transcriptformer.config import LossConfig, ModelConfig
from transcriptformer.model.generate import Sampler, full_pass_output, generate_cells
from transcriptformer.model.transcriptformer import SpecialTokens, TranscriptFormer
from transcriptformer.runtime import use_cpu_threads

N_SPECIAL = 7  # unknown, [PAD], [START], [END], [RD], [CELL], [MASK]


def random_model(layers: int, width: int, seq_len: int, vocab: int) -> TranscriptFormer:
    torch.manual_seed(0)
    config = ModelConfig(
        num_layers=layers,
        num_heads=4,
        embed_dim=width,
        model_dim=2 * width,
        seq_len=seq_len,
        gene_head_hidden_dim=width,
        dropout=0.0,
    )
    table = torch.randn(vocab, 64)
    model = TranscriptFormer(
        config, LossConfig(), table, SpecialTokens(pad=1, start=2, end=3), {"assay": {"unknown": 0}}
    )
    return model.eval()


def run(model: TranscriptFormer, cells: int, genes: int, use_cache: bool):
    excluded = torch.zeros(model.mu.gene_embedding.num_embeddings, dtype=torch.bool)
    excluded[:N_SPECIAL] = True  # [END] included: every cell gets all its genes
    start = time.perf_counter()
    result = generate_cells(
        model,
        torch.zeros(cells, 1, dtype=torch.long),
        torch.full((cells,), genes),
        torch.full((cells,), 2.0 * genes, dtype=torch.float64),
        [np.random.default_rng([0, i]) for i in range(cells)],
        excluded,
        sampler=Sampler(temperature=1.0, top_k=0, top_p=1.0),
        max_count=30.0,
        use_cache=use_cache,
    )
    return time.perf_counter() - start, result


def estimated_uncached_seconds(model: TranscriptFormer, cells, genes: int, timed_steps: int) -> float:
    """Sum over positions ``0 .. genes - 1`` of one forward pass over the genes before it (timed at a few)."""
    aux = torch.zeros(cells.tokens.shape[0], 1, dtype=torch.long)
    positions = np.unique(np.linspace(0, genes - 1, timed_steps).astype(int))
    seconds = []
    with torch.no_grad():
        for i in positions:
            start = time.perf_counter()
            full_pass_output(model, cells.tokens[:, :i], cells.counts[:, :i], aux)
            seconds.append(time.perf_counter() - start)
    return float(np.interp(np.arange(genes), positions, seconds).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=4, help="cells generated together")
    parser.add_argument("--lengths", type=int, nargs="+", default=[511, 2047], help="genes per cell")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=20000, help="vocabulary size (genes + special tokens)")
    parser.add_argument("--full-uncached-up-to", type=int, default=511, help="longer: uncached time estimated")
    parser.add_argument("--timed-steps", type=int, default=24, help="forward passes timed for an estimate")
    args = parser.parse_args()
    threads = use_cpu_threads()
    model = random_model(args.layers, args.width, max(args.lengths), args.vocab)
    print(f"{args.layers} layers x {args.width} wide, vocabulary {args.vocab}, {args.cells} cells, {threads} threads")
    for genes in args.lengths:
        cached_time, cached = run(model, args.cells, genes, use_cache=True)
        if genes <= args.full_uncached_up_to:
            full_time, full = run(model, args.cells, genes, use_cache=False)
            same = torch.equal(cached.tokens, full.tokens) and torch.equal(cached.counts, full.counts)
            how = f"same cells: {same}"
        else:
            full_time = estimated_uncached_seconds(model, cached, genes, args.timed_steps)
            how = f"uncached estimated from {args.timed_steps} timed forward passes, without sampling: a lower bound"
        print(
            f"{genes} genes: cached {cached_time:.1f} s ({args.cells * genes / cached_time:.0f} genes/s), "
            f"uncached {full_time:.1f} s ({args.cells * genes / full_time:.0f} genes/s), "
            f"speed-up {full_time / cached_time:.1f}x; {how}"
        )


if __name__ == "__main__":
    main()
