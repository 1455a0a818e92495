"""Parity of the reference checkpoint on a GPU, per attention backend and precision.

Usage (on a CUDA machine): ``python benchmarks/gpu_check.py``. Prints, for each backend, the largest relative
error against the original implementation's outputs and the time for the 64 reference cells.
"""

import time
from pathlib import Path

import numpy as np
import torch

import transcriptformer

REFERENCE = Path(__file__).resolve().parents[1] / "test" / "data" / "reference_tiny"
KEYS = ("embeddings", "llh", "gene_llh", "mu")


def main() -> None:
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    with np.load(REFERENCE / "expected.npz") as npz:
        expected = dict(npz)
    runs = (("auto", "32"), ("auto", "bf16-mixed"), ("chunked", "32"))
    for backend, precision in runs:
        model = transcriptformer.load(REFERENCE, device="cuda", attention_backend=backend)
        cells = model.tokenize(REFERENCE / "input.h5ad")
        settings = {"output_keys": KEYS, "precision": precision}
        model.predict(cells, batch_size=16, **settings)  # compile and warm up
        model.predict(cells, batch_size=7, **settings)  # other batch shapes must not fail or recompile without end
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = model.predict(cells, batch_size=16, **settings)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        errors = ", ".join(
            f"{k} {np.max(np.abs(result[k] - expected[k])) / np.abs(expected[k]).max():.1e}" for k in KEYS
        )
        print(f"{backend:8s} {precision:15s} 64 cells in {seconds * 1e3:.1f} ms; max error / max |value|: {errors}")


if __name__ == "__main__":
    main()
