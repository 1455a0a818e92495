"""Streaming inference from a local TileDB-SOMA experiment of a million real-looking cells: cells/s and peak RSS.

Writes a SOMA experiment of ``--cells`` cells (once; kept at ``--experiment`` for later runs) resampled from the
bundled real cells, ``test/data/mouse_brain_1k.h5ad`` (MERFISH, 1,122 genes): each new cell takes a random real
cell's counts and redraws every count from a Poisson of that count, so that library sizes and sparsity stay those
of real cells while no two cells are equal. The experiment is written in blocks of cells, so memory stays bounded.
obs has the columns of the CELLxGENE schema that a run reads (``assay``, ``cell_type``, ``tissue``,
``is_primary_data``, ...), var the genes' ``feature_id``.

Then, each in a fresh child process that prints its own peak RSS (``ru_maxrss``) when it exits:

(a) ``reader``: read and tokenize every cell of the experiment as a run does (a ``SomaReader`` opened with the demo
    checkpoint's tokenizer, which checks every count, then every unit tokenized), no model;
(b) ``esm2ce``: ``transcriptformer inference --model-type esm2ce`` (the mean of the cells' gene-embedding rows; a
    cheap model, so that reading, tokenizing and writing dominate) over the first N cells for each N of
    ``--esm2ce-cells`` (10k, 100k, 1M), embeddings written to a SOMA array: peak RSS against N;
(c) ``demo``: the demo model (``models/demo-mouse-brain``) over the first N cells for each N of ``--demo-cells``,
    embeddings written to a SOMA array: peak RSS against N;
(d) ``query-memory``: ``--model-type esm2ce`` as in (b) over a 10,000- and a 100,000-cell query (``--obs-filter
    "soma_joinid < N"``) and over the query of every cell (no filter), the same units of ``--chunk-size`` cells
    computed at a time: whether the peak RSS depends on the size of the query (it should not: nothing is held per
    query cell). The array writer holds one fragment of about two million values (some 170 MB), which a query of
    10,000 cells does not fill: compare the larger queries for the write.

Cells are chosen with ``--obs-filter "soma_joinid < N"``. Usage::

    nice python benchmarks/soma_scale.py [--cells 1000000] [--experiment /tmp/soma_1m] \
        [--only reader esm2ce demo query-memory]

``PYTHONPATH=<a checkout>/src`` measures that checkout's code: the children inherit it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import tiledbsoma as soma

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "test" / "data" / "mouse_brain_1k.h5ad"
DEMO = ROOT / "models" / "demo-mouse-brain"
OBS_COLUMNS = ["assay", "cell_type", "tissue", "major_brain_region", "is_primary_data", "donor_id"]


def obs_block(source: pd.DataFrame, picked: np.ndarray, first: int) -> pa.Table:
    """The obs rows ``first ..`` of the cells resampled from the source rows ``picked``."""
    frame = source.iloc[picked][OBS_COLUMNS].reset_index(drop=True)
    frame.insert(0, "obs_id", [f"cell{first + i}" for i in range(picked.size)])
    frame.insert(0, "soma_joinid", np.arange(first, first + picked.size, dtype=np.int64))
    return pa.Table.from_pandas(frame, preserve_index=False)


def x_block(counts, picked: np.ndarray, first: int, rng: np.random.Generator) -> pa.Table:
    """The counts of the resampled cells as SOMA coordinates: each count redrawn from a Poisson of the real one."""
    rows = counts[picked]
    values = rng.poisson(rows.data).astype(np.float32)
    cells = np.repeat(np.arange(first, first + picked.size, dtype=np.int64), np.diff(rows.indptr))
    kept = values > 0
    return pa.table(
        {"soma_dim_0": cells[kept], "soma_dim_1": rows.indices[kept].astype(np.int64), "soma_data": values[kept]}
    )


def write_experiment(uri: str, n_cells: int, block: int = 50_000, seed: int = 0) -> None:
    """A SOMA experiment of ``n_cells`` resampled cells, written ``block`` cells at a time."""
    source = ad.read_h5ad(SOURCE)
    counts = source.X.tocsr()
    rng = np.random.default_rng(seed)
    var = pd.DataFrame(
        {
            "soma_joinid": np.arange(source.n_vars, dtype=np.int64),
            "feature_id": source.var["ensembl_id"].astype(str).to_numpy(),
            "feature_name": source.var["feature_name"].astype(str).to_numpy(),
        }
    )
    obs_schema = obs_block(source.obs, np.arange(2), 0).schema
    var_table = pa.Table.from_pandas(var, preserve_index=False)
    with soma.Experiment.create(uri) as experiment:
        experiment.add_new_dataframe(
            "obs", schema=obs_schema, index_column_names=["soma_joinid"], domain=[(0, n_cells - 1)]
        ).close()
        rna = experiment.add_new_collection("ms").add_new_collection("RNA", soma.Measurement)
        rna.add_new_dataframe(
            "var", schema=var_table.schema, index_column_names=["soma_joinid"], domain=[(0, source.n_vars - 1)]
        ).close()
        rna.add_new_collection("X").add_new_sparse_ndarray(
            "raw", type=pa.float32(), shape=(n_cells, source.n_vars)
        ).close()
    # Written through handles opened by URI: tiledbsoma 2.3 drops the categories of a dictionary column written
    # through the handle that add_new_dataframe returns.
    with soma.open(f"{uri}/ms/RNA/var", "w") as var_array:
        var_array.write(var_table)
    with soma.open(f"{uri}/obs", "w") as obs, soma.open(f"{uri}/ms/RNA/X/raw", "w") as x:
        for first in range(0, n_cells, block):
            picked = rng.integers(0, source.n_obs, size=min(block, n_cells - first))
            obs.write(obs_block(source.obs, picked, first))
            x.write(x_block(counts, picked, first, rng))
            print(f"  {first + picked.size:,} cells written", flush=True)


def folder_mb(path: Path) -> float:
    """Size of a folder's files, MB."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


# Prepended to every child's code: the child prints its own peak RSS (ru_maxrss of RUSAGE_SELF, KB) when it exits.
PEAK_RSS = (
    "import atexit, resource, sys\n"
    "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "atexit.register(lambda: print('peak_rss_kb', peak(), file=sys.stderr))\n"
)
CLI = PEAK_RSS + "from transcriptformer.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def run_child(code: str, *args: str) -> tuple[float, float, str]:
    """Run ``python -c code args``; its own peak RSS (MB), the wall time (s) and its output."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{args[:4]} failed:\n{done.stderr[-3000:]}")
    peak_kb = next(line.split()[1] for line in reversed(done.stderr.splitlines()) if line.startswith("peak_rss_kb"))
    return int(peak_kb) / 1024, seconds, done.stdout


READER = (
    PEAK_RSS
    + """
import json, time
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.data.soma import SomaReader
from transcriptformer.data.tokenize import FEATURE_ID_COLUMN
uri, chunk = sys.argv[1], int(sys.argv[2])
tokenizer = load_checkpoint(sys.argv[3], "cpu").tokenizer(gene_col_name=FEATURE_ID_COLUMN)
start = time.perf_counter()
with SomaReader(uri, obs_columns=["assay"]) as reader:
    opened = time.perf_counter() - start
    cells = tokenizer.prepare(reader)
    checked = time.perf_counter() - start
    tokens = sum(int(cells.cells(s, min(s + chunk, len(cells))).n_tokens().sum()) for s in range(0, len(cells), chunk))
print(json.dumps({"cells": len(cells), "tokens": tokens, "open": opened, "check": checked,
                  "total": time.perf_counter() - start}))
"""
)


def measure_reader(uri: str, chunk: int) -> None:
    peak, seconds, out = run_child(READER, uri, str(chunk), str(DEMO))
    r = json.loads(out.strip().splitlines()[-1])
    print(
        f"(a) reader: {r['cells']:,} cells ({r['tokens']:,} tokens) opened in {r['open']:.1f} s, counts checked by "
        f"{r['check']:.1f} s, all read and tokenized in {r['total']:.1f} s: {r['cells'] / r['total']:,.0f} cells/s "
        f"(both passes); peak RSS {peak:.0f} MB; {seconds:.0f} s with start-up",
        flush=True,
    )


def measure_inference(
    uri: str, n_cells: int, extra: list[str], label: str, tmp: Path, whole_query: bool = False
) -> None:
    """A run over the first ``n_cells`` cells (``whole_query``: the query of every cell, without a filter)."""
    output = tmp / f"{label.split()[0]}-{n_cells}"
    query = [] if whole_query else ["--obs-filter", f"soma_joinid < {n_cells}"]
    arguments = [
        "inference", "--checkpoint-path", str(DEMO), "--soma", uri, *query,
        "--obs-keys", "assay", "--output-path", str(output), "--output-soma", str(output / "embeddings.soma"),
        "--device", "cpu", *extra,
    ]  # fmt: skip
    peak, seconds, out = run_child(CLI, *arguments)
    summary = next(line for line in out.splitlines() if " cells/s) on " in line)
    print(
        f"{label}: {n_cells:,} cells, peak RSS {peak:.0f} MB, {seconds:.0f} s wall ({n_cells / seconds:,.0f} cells/s)\n"
        f"  run's own summary: {summary.strip()}; SOMA array {folder_mb(output / 'embeddings.soma'):.0f} MB",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--experiment", default=str(Path(tempfile.gettempdir()) / "transcriptformer_soma_1m"))
    parser.add_argument("--esm2ce-cells", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--demo-cells", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--chunk-size", type=int, default=1024)
    modes = ["reader", "esm2ce", "demo", "query-memory"]
    parser.add_argument("--only", nargs="+", choices=modes, default=modes[:3])
    args = parser.parse_args()

    uri = args.experiment
    if not Path(uri).exists():
        start = time.perf_counter()
        write_experiment(uri, args.cells)
        print(f"wrote {args.cells:,} cells to {uri} in {time.perf_counter() - start:.0f} s")
    # Not X's nnz: tiledbsoma counts it by reading every entry (1.3 GB here), and a child's ru_maxrss starts from its
    # parent's at the fork, so this process must stay small.
    with soma.open(uri) as experiment:
        n_cells = experiment.obs.count
    print(f"experiment {uri}: {n_cells:,} cells, {folder_mb(Path(uri)):.0f} MB on disk", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "reader" in args.only:
            measure_reader(uri, args.chunk_size)
        if "esm2ce" in args.only:
            for cells in args.esm2ce_cells:
                measure_inference(uri, min(cells, n_cells), ["--model-type", "esm2ce"], "(b) esm2ce", Path(tmp))
        if "demo" in args.only:
            for cells in args.demo_cells:
                measure_inference(uri, min(cells, n_cells), [], "(c) demo model", Path(tmp))
        if "query-memory" in args.only:
            print(f"load average {os.getloadavg()[0]:.1f}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
            esm2ce = ["--model-type", "esm2ce", "--chunk-size", str(args.chunk_size)]
            for cells in (10_000, 100_000):
                measure_inference(uri, min(cells, n_cells), esm2ce, f"(d) {cells:,}-cell query", Path(tmp))
            measure_inference(uri, n_cells, esm2ce, "(d) whole query", Path(tmp), whole_query=True)
            print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
