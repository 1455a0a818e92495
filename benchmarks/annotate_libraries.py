"""Which vector index: FAISS (exact, and the approximate index of the annotation) against pynndescent.

The cells are resampled from the bundled mouse brain cells and projected to 2,048 dimensions as in
``annotate_index.py``; cosine similarity. Per library: build time (wall and CPU), the growth of the resident memory
while building (the index and the vectors it keeps), the time to find the 15 neighbours of the query cells, and
their recall@15 against exact search. hnswlib is not measured: it has no wheel for this platform (``pip install
hnswlib`` compiles it), and like pynndescent it keeps every vector in float32.

    python benchmarks/annotate_libraries.py --reference-cells 50000
"""

import argparse
import resource
import time
import warnings

import faiss
import numpy as np
from annotate_index import Resampler

from transcriptformer.annotation import AnnotateConfig, ReferenceIndex

K = 15


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, build, search, exact: np.ndarray) -> None:
    before, start, cpu = rss_gib(), time.perf_counter(), cpu_seconds()
    index = build()
    built, build_cpu, grown = time.perf_counter() - start, cpu_seconds() - cpu, rss_gib() - before
    start, cpu = time.perf_counter(), cpu_seconds()
    ids = search(index)
    searched, search_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    recall = np.mean([len(set(a) & set(e)) / K for a, e in zip(ids, exact, strict=True)])
    print(
        f"| {name} | {built:.0f} s ({build_cpu:.0f} s CPU) | {grown:.2f} GiB | {searched:.1f} s ({search_cpu:.1f} s "
        f"CPU) | {recall:.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-cells", type=int, default=50_000)
    parser.add_argument("--query-cells", type=int, default=2_000)
    args = parser.parse_args()

    resampler = Resampler(2048)
    reference, types = resampler.cells(args.reference_cells, seed=1)
    query, _ = resampler.cells(args.query_cells, seed=0)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(reference.shape[1])
    flat.add(reference)
    exact = flat.search(query, K)[1]
    del flat

    print(f"{args.reference_cells:,} reference cells, {args.query_cells:,} query cells, 2,048 dimensions, cosine")
    print("| index | build | memory growth | search | recall@15 |")
    print("|---|---|---|---|---|")

    def faiss_build(exact_max_cells: int):
        settings = AnnotateConfig(exact_max_cells=exact_max_cells, calibration_cells=100)  # the index alone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ReferenceIndex.build(reference, {"cell_type": types}, settings=settings)

    def faiss_search(index):
        return index.search(query, K)[0]

    measure("FAISS flat (exact)", lambda: faiss_build(args.reference_cells), faiss_search, exact)
    measure("FAISS IVF-PQ4fs + SQ8 refine (n_probe 32)", lambda: faiss_build(0), faiss_search, exact)

    from pynndescent import NNDescent

    state = {}

    def nnd_build():
        state["index"] = NNDescent(reference, metric="cosine", n_neighbors=30, random_state=0)
        state["index"].prepare()
        return state["index"]

    measure("pynndescent (n_neighbors 30)", nnd_build, lambda index: index.query(query, k=K)[0], exact)


if __name__ == "__main__":
    main()
