"""Annotation at atlas scale: a million-cell reference index within 4 GB, 10,000 query cells, recall@15.

The reference and the query are resampled from the real cells of test/data/mouse_brain_1k.h5ad: each new cell
mixes the counts of two cells of one type (weight of the second uniform in [0, 0.5]) and draws its counts from
Poisson distributions with those means; the log-normalised counts are projected to 2,048 dimensions (as
TF-Sapiens' embeddings) by one fixed Gaussian matrix; the Poisson draws make every cell distinct. The reference
is written to an HDF5 file (as a backed ``.h5ad``'s ``obsm``) and indexed from it chunk by chunk.

Three processes, each measured alone (peak RSS from ``getrusage``): the build (``ReferenceIndex.build`` and
``save``), the exact search (every distance, for ``--truth-cells`` query cells), and the annotation (``load`` and
``annotate`` of every query cell, then the neighbours of the truth cells, whose recall@15 against exact search is
reported).

    python benchmarks/annotate_index.py                                  # 1,000,000 cells: ~10 GB of disk
    python benchmarks/annotate_index.py --reference-cells 100000         # a quick run
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
from scipy import sparse

from transcriptformer.annotation import AnnotateConfig, ReferenceIndex

DATA = Path(__file__).parent.parent / "test" / "data" / "mouse_brain_1k.h5ad"
KEY = "cell_type"
CHUNK = 50_000


class Resampler:
    """New cells like the bundled ones, embedded in ``dimension`` dimensions by one fixed random projection."""

    def __init__(self, dimension: int, seed: int = 0) -> None:
        cells = ad.read_h5ad(DATA)
        self.counts = cells.X.toarray().astype(np.float32)
        self.types = cells.obs[KEY].astype(str).to_numpy()
        self.by_type = np.argsort(self.types, kind="stable")  # cells grouped by type
        _, self.type_start, self.type_size = np.unique(self.types[self.by_type], return_index=True, return_counts=True)
        self.type_of = np.searchsorted(np.unique(self.types), self.types)
        rng = np.random.default_rng(seed)
        self.projection = (rng.standard_normal((self.counts.shape[1], dimension)) / np.sqrt(dimension)).astype(
            np.float32
        )

    def embed(self, counts: np.ndarray) -> np.ndarray:
        """Log-normalised counts, projected."""
        totals = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        return sparse.csr_matrix(np.log1p(counts / totals * 1e4)) @ self.projection  # 9 % of the genes expressed

    def cells(self, n_cells: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``n_cells`` new embeddings and their cell types."""
        rng = np.random.default_rng(seed)
        first = rng.integers(len(self.types), size=n_cells)
        group = self.type_of[first]
        second = self.by_type[self.type_start[group] + rng.integers(self.type_size[group])]
        weight = rng.uniform(0, 0.5, size=(n_cells, 1)).astype(np.float32)
        means = (1 - weight) * self.counts[first] + weight * self.counts[second]
        expressed = means > 0
        counts = np.zeros_like(means)
        counts[expressed] = rng.poisson(means[expressed])
        return self.embed(counts), self.types[first]


def write_reference(path: Path, resampler: Resampler, n_cells: int) -> None:
    with h5py.File(path, "w") as f:
        embeddings = f.create_dataset("X", (n_cells, resampler.projection.shape[1]), dtype="f4", chunks=(1024, 256))
        types = []
        for start in range(0, n_cells, CHUNK):
            stop = min(start + CHUNK, n_cells)
            embeddings[start:stop], chunk_types = resampler.cells(stop - start, seed=1 + start // CHUNK)
            types.append(chunk_types)
        f.create_dataset(KEY, data=np.concatenate(types).astype("S"))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build(args: argparse.Namespace) -> dict:
    """Index the reference from the HDF5 file (chunk by chunk) and save it."""
    settings = AnnotateConfig(n_probe=args.n_probe, n_lists=args.n_lists)
    with h5py.File(args.work / "reference.h5") as f:
        labels = {KEY: f[KEY][:].astype(str)}
        start, cpu = time.perf_counter(), cpu_seconds()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index = ReferenceIndex.build(f["X"], labels, settings=settings, model_id="resampled-mouse-brain")
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    index.save(args.work / "index")
    size = sum(p.stat().st_size for p in (args.work / "index").iterdir())
    return {
        "build_s": seconds,
        "build_cpu_s": cpu,
        "peak_rss_gib": peak_rss_gib(),
        "index_gib": size / 2**30,
        "exact": index.exact,
        "threshold": index.calibration[KEY].threshold,
        "held_out_accuracy": index.calibration[KEY].accuracy,
    }


def exact_neighbors(args: argparse.Namespace, truth: np.ndarray, k: int) -> dict:
    """The ``k`` nearest reference cells of the truth cells by cosine, every similarity computed."""
    truth = truth / np.linalg.norm(truth, axis=1, keepdims=True)
    best_ids = np.empty((len(truth), 0), dtype=np.int64)
    best = np.empty((len(truth), 0), dtype=np.float32)
    start = time.perf_counter()
    with h5py.File(args.work / "reference.h5") as f:
        for offset in range(0, f["X"].shape[0], CHUNK):
            chunk = f["X"][offset : offset + CHUNK]
            similarity = truth @ (chunk / np.linalg.norm(chunk, axis=1, keepdims=True)).T
            ids = np.concatenate([best_ids, offset + np.broadcast_to(np.arange(len(chunk)), similarity.shape)], axis=1)
            similarity = np.concatenate([best, similarity], axis=1)
            top = np.argpartition(-similarity, k, axis=1)[:, :k]
            best_ids, best = np.take_along_axis(ids, top, 1), np.take_along_axis(similarity, top, 1)
    return {"exact_s": time.perf_counter() - start, "ids": best_ids.tolist(), "peak_rss_gib": peak_rss_gib()}


def annotate(args: argparse.Namespace, query: np.ndarray, query_types: np.ndarray, truth: np.ndarray) -> dict:
    """Load the saved index, annotate every query cell, and find the truth cells' neighbours."""
    start = time.perf_counter()
    index = ReferenceIndex.load(args.work / "index")
    loaded, cpu = time.perf_counter(), cpu_seconds()
    frame = index.annotate(query, model_id="resampled-mouse-brain")
    annotated, cpu = time.perf_counter(), cpu_seconds() - cpu
    vectors = truth / np.linalg.norm(truth, axis=1, keepdims=True)
    ids, _ = index.search(np.ascontiguousarray(vectors, dtype=np.float32), index.settings.n_neighbors)
    predicted = frame[f"predicted_{KEY}"].astype(str).to_numpy()
    return {
        "load_s": loaded - start,
        "annotate_s": annotated - loaded,
        "annotate_cpu_s": cpu,
        "peak_rss_gib": peak_rss_gib(),
        "accuracy": float((predicted == query_types).mean()),
        "unknown": float((predicted == "Unknown").mean()),
        "ids": ids.tolist(),
    }


def run_phase(phase: str, args: argparse.Namespace) -> dict:
    """Run one phase in a new process, so that its peak RSS is its own."""
    argv = [sys.executable, __file__, "--phase", phase, "--work", str(args.work)]
    argv += ["--reference-cells", str(args.reference_cells), "--query-cells", str(args.query_cells)]
    argv += ["--truth-cells", str(args.truth_cells), "--dimension", str(args.dimension)]
    argv += ["--n-probe", str(args.n_probe)]
    argv += ["--n-lists", str(args.n_lists)] if args.n_lists else []
    output = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-cells", type=int, default=1_000_000)
    parser.add_argument("--query-cells", type=int, default=10_000)
    parser.add_argument("--truth-cells", type=int, default=1_000, help="query cells searched exactly for recall")
    parser.add_argument("--dimension", type=int, default=2048)
    parser.add_argument("--n-probe", type=int, default=AnnotateConfig.n_probe)
    parser.add_argument("--n-lists", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None, help="folder of the reference file and the index")
    parser.add_argument("--phase", choices=["build", "exact", "annotate"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        resampler = Resampler(args.dimension)
        query, query_types = resampler.cells(args.query_cells, seed=0)
        truth = query[: args.truth_cells]
        k = AnnotateConfig.n_neighbors
        result = {
            "build": lambda: build(args),
            "exact": lambda: exact_neighbors(args, truth, k),
            "annotate": lambda: annotate(args, query, query_types, truth),
        }[args.phase]()
        print(json.dumps(result))
        return

    own_work = args.work is None
    args.work = args.work or Path(tempfile.mkdtemp(prefix="annotate_index_"))
    try:
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
        start = time.perf_counter()
        write_reference(args.work / "reference.h5", Resampler(args.dimension), args.reference_cells)
        seconds = time.perf_counter() - start
        print(f"reference: {args.reference_cells:,} cells x {args.dimension} written in {seconds:.0f} s")
        built = run_phase("build", args)
        kind = "exact" if built["exact"] else "IVF-PQ4fs + SQ8 refine"
        print(
            f"build ({kind}): {built['build_s']:.0f} s ({built['build_cpu_s']:.0f} s CPU), peak RSS "
            f"{built['peak_rss_gib']:.2f} GiB, index on disk {built['index_gib']:.2f} GiB; Unknown threshold "
            f"{built['threshold']:.3f}, held-out reference accuracy {built['held_out_accuracy']:.3f}"
        )
        exact = run_phase("exact", args)
        print(f"exact search of {args.truth_cells:,} query cells: {exact['exact_s']:.0f} s")
        found = run_phase("annotate", args)
        recall = np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(found["ids"], exact["ids"], strict=True)])
        print(
            f"annotate {args.query_cells:,} query cells: load {found['load_s']:.1f} s, annotate "
            f"{found['annotate_s']:.1f} s ({found['annotate_cpu_s']:.1f} s CPU), peak RSS "
            f"{found['peak_rss_gib']:.2f} GiB; accuracy {found['accuracy']:.3f}, Unknown {found['unknown']:.3f}"
        )
        print(f"recall@15 against exact search: {recall:.3f}")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        if own_work:
            shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
