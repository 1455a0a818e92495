"""Unknown cells: one cell type held out of the reference, on the real cells of test/data/mouse_brain_1k.h5ad.

The cells are split at random into a reference and a query (half each, ``--seed``). For each cell type with at
least ``--min-cells`` cells, the reference loses that type; the query is annotated from the rest (defaults of
``transcriptformer.annotate``: 15 neighbours, cosine, threshold at 5 % of the held-out reference cells labelled
correctly). Reported per held-out type: the share of its query cells called Unknown (higher is better), the share
of the other query cells called Unknown (lower is better), and the macro F1 of the query cells of the known types,
without rejection and with it (an Unknown counts as an error), over the classes of the reference.

Embeddings: ``pca`` (50 components of the log-normalised counts, fitted on the reference) or ``demo`` (the demo
checkpoint models/demo-mouse-brain, through ``transcriptformer.load(...).embed``).

    python benchmarks/annotate_holdout.py
    python benchmarks/annotate_holdout.py --embedding demo
"""

import argparse
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
from sklearn.decomposition import PCA
from sklearn.metrics import f1_score

import transcriptformer
from transcriptformer.annotation import UNKNOWN, ReferenceIndex

ROOT = Path(__file__).parent.parent
DATA = ROOT / "test" / "data" / "mouse_brain_1k.h5ad"
DEMO = ROOT / "models" / "demo-mouse-brain"
KEY = "cell_type"


def embeddings(cells: ad.AnnData, kind: str) -> np.ndarray | None:
    """The demo checkpoint's embeddings; ``None`` for PCA, which is fitted per reference."""
    if kind == "demo":
        return transcriptformer.load(str(DEMO)).embed(cells, key_added=None)
    return None


def log_normalised(cells: ad.AnnData) -> np.ndarray:
    cells = cells.copy()
    sc.pp.normalize_total(cells, target_sum=1e4)
    sc.pp.log1p(cells)
    return cells.X.toarray()


def hold_out(
    values: np.ndarray, model: np.ndarray | None, types: np.ndarray, in_reference: np.ndarray, held_out: str
) -> dict:
    reference = in_reference & (types != held_out)
    query = ~in_reference
    if model is None:
        pca = PCA(50, random_state=0).fit(values[reference])
        reference_vectors, query_vectors = pca.transform(values[reference]), pca.transform(values[query])
    else:
        reference_vectors, query_vectors = model[reference], model[query]
    truth = types[query]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's classes of one or two cells
        index = ReferenceIndex.build(reference_vectors, {KEY: types[reference]})
    plain = index.annotate(query_vectors, reject=False)[f"predicted_{KEY}"].astype(str).to_numpy()
    rejected = index.annotate(query_vectors)[f"predicted_{KEY}"].astype(str).to_numpy()
    novel = truth == held_out
    known_classes = np.unique(truth[~novel])
    names, counts = np.unique(plain[novel], return_counts=True)
    return {
        "type": held_out,
        "cells": int(novel.sum()),
        "unknown_novel": (rejected[novel] == UNKNOWN).mean(),
        "unknown_known": (rejected[~novel] == UNKNOWN).mean(),
        "f1_plain": f1_score(truth[~novel], plain[~novel], labels=known_classes, average="macro", zero_division=0),
        "f1_reject": f1_score(truth[~novel], rejected[~novel], labels=known_classes, average="macro", zero_division=0),
        "called": names[counts.argmax()],
        "threshold": index.calibration[KEY].threshold,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedding", choices=["pca", "demo"], default="pca")
    parser.add_argument("--min-cells", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cells = ad.read_h5ad(DATA)
    types = cells.obs[KEY].astype(str).to_numpy()
    values, model = log_normalised(cells), embeddings(cells, args.embedding)
    in_reference = np.random.default_rng(args.seed).random(cells.n_obs) < 0.5
    names, counts = np.unique(types, return_counts=True)
    held_out_types = names[counts >= args.min_cells][np.argsort(-counts[counts >= args.min_cells])]

    print(f"embedding: {args.embedding}; reference {in_reference.sum()} cells, query {(~in_reference).sum()} cells")
    print(
        "| held-out type | its query cells | called Unknown | other cells called Unknown | macro F1 known, no "
        "rejection | macro F1 known, rejection | threshold | called without rejection |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = [hold_out(values, model, types, in_reference, held_out) for held_out in held_out_types]
    for r in rows:
        print(
            f"| {r['type']} | {r['cells']} | {r['unknown_novel']:.2f} | {r['unknown_known']:.2f} | {r['f1_plain']:.3f} "
            f"| {r['f1_reject']:.3f} | {r['threshold']:.3f} | {r['called']} |"
        )
    mean = {key: np.mean([r[key] for r in rows]) for key in ("unknown_novel", "unknown_known", "f1_plain", "f1_reject")}
    print(
        f"| mean | | {mean['unknown_novel']:.2f} | {mean['unknown_known']:.2f} | {mean['f1_plain']:.3f} "
        f"| {mean['f1_reject']:.3f} | | |"
    )


if __name__ == "__main__":
    main()
