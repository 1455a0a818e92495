"""Peak memory of streaming inference over a large backed ``.h5ad``.

Writes a file of ``--cells`` real cells (the bundled reference cells repeated, written row block by row block),
then runs ``transcriptformer inference`` on it in a child process and prints that process's peak RSS, next
to the peak RSS of merely loading the model, so that the memory that the cells cost can be read off.

Usage: ``python benchmarks/bench_memory.py [--cells 200000] [--output-keys embeddings llh]``
"""

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from anndata.io import write_elem

REFERENCE = Path(__file__).resolve().parents[1] / "test" / "data" / "reference_tiny"


def write_large_h5ad(path: Path, n_cells: int, block: int = 10_000) -> None:
    """``n_cells`` cells in CSR, written one block of rows at a time (never whole in memory)."""
    source = ad.read_h5ad(REFERENCE / "input.h5ad")
    rows = source.X.tocsr()
    with h5py.File(path, "w") as f:
        group = f.create_group("X")
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
        group.attrs["shape"] = (n_cells, source.n_vars)
        data = group.create_dataset("data", (0,), dtype=np.float32, maxshape=(None,), chunks=(1 << 16,))
        indices = group.create_dataset("indices", (0,), dtype=np.int32, maxshape=(None,), chunks=(1 << 16,))
        indptr = [0]
        for start in range(0, n_cells, block):
            picked = rows[np.arange(start, min(start + block, n_cells)) % rows.shape[0]]
            for dataset, values in ((data, picked.data), (indices, picked.indices)):
                dataset.resize(dataset.shape[0] + len(values), axis=0)
                dataset[-len(values) :] = values
            indptr.extend(indptr[-1] + picked.indptr[1:])
        group.create_dataset("indptr", data=np.asarray(indptr, dtype=np.int64))
        obs = pd.DataFrame({"assay": pd.Categorical(["MERFISH"] * n_cells)}, index=[f"cell{i}" for i in range(n_cells)])
        write_elem(f, "obs", obs)
        write_elem(f, "var", source.var)
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, name, {})
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})


def child_peak_rss_mb(command: list[str]) -> tuple[float, float]:
    """Run ``command``; return its peak RSS (MB) and wall time (s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("the child's peak RSS did not exceed an earlier child's; run this script afresh")
    return peak / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--output-keys", nargs="+", default=["embeddings", "llh"])
    parser.add_argument("--max-tokens-per-batch", type=int, default=4096)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "cells.h5ad"
        write_large_h5ad(data, args.cells)
        print(f"{args.cells} cells written to a backed h5ad of {data.stat().st_size / 2**20:.0f} MB")
        load_only = [sys.executable, "-c", f"import transcriptformer; transcriptformer.load({str(REFERENCE)!r}, 'cpu')"]
        model_rss, _ = child_peak_rss_mb(load_only)
        inference = [
            sys.executable, "-m", "transcriptformer", "inference",
            "--checkpoint-path", str(REFERENCE), "--data-file", str(data), "--output-path", tmp,
            "--output-keys", *args.output_keys, "--max-tokens-per-batch", str(args.max_tokens_per_batch),
        ]  # fmt: skip
        run_rss, seconds = child_peak_rss_mb(inference)
        output = Path(tmp) / "embeddings.h5ad"
        written = ad.read_h5ad(output, backed="r")
        print(
            f"peak RSS: {model_rss:.0f} MB loading the model alone, {run_rss:.0f} MB for inference over "
            f"{written.n_obs} cells ({run_rss - model_rss:.0f} MB above the model) in {seconds:.0f} s "
            f"({written.n_obs / seconds:.0f} cells/s); output {output.stat().st_size / 2**20:.0f} MB"
        )


if __name__ == "__main__":
    main()
