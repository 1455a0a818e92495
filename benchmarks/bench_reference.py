"""Time the reference checkpoint's 64 cells and report the parity error reached.

Usage: ``python benchmarks/bench_reference.py [--device cpu] [--repeats 5]``
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import transcriptformer

REFERENCE = Path(__file__).resolve().parents[1] / "test" / "data" / "reference_tiny"
OUTPUTS = ("embeddings", "llh", "gene_llh", "mu")  # those of expected.npz


def max_relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-6)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    with np.load(REFERENCE / "expected.npz") as npz:
        expected = dict(npz)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    settings = {"batch_size": args.batch_size, "output_keys": OUTPUTS, "precision": "32"}
    for backend in ("chunked", "flex"):
        model = transcriptformer.load(REFERENCE, device=args.device, attention_backend=backend)
        cells = model.tokenize(REFERENCE / "input.h5ad")
        result = model.predict(cells, **settings)  # warm-up
        errors = {k: max_relative_error(result[k], expected[k]) for k in OUTPUTS}
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model.predict(cells, **settings)
            times.append(time.perf_counter() - start)
        load_start = time.perf_counter()
        model.predict(REFERENCE / "input.h5ad", **settings)
        end_to_end = time.perf_counter() - load_start
        best = min(times)
        print(
            f"{backend:8s} 64 cells: {best * 1e3:.1f} ms best of {args.repeats} ({64 / best:.0f} cells/s), "
            f"{end_to_end * 1e3:.1f} ms including reading and tokenizing the h5ad; "
            "max relative error " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        )


if __name__ == "__main__":
    main()
