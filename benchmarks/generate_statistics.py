"""Generated cells against the real cells they take their targets from: statistics and a figure.

The demo model generates one cell per bundled held-out mouse brain cell (its assay, number of genes and total
count as targets; no gene prompt). Printed: median genes per cell and total count of real and generated cells,
the Pearson r of the mean count of the real cells' 50 most expressed genes (and of all genes), the generation
throughput; written: ``docs/images/generate_real_vs_generated.png``.

Usage: ``python benchmarks/generate_statistics.py [--seed 0] [--figure PATH]``
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import transcriptformer  # noqa: E402
from transcriptformer.runtime import use_cpu_threads  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def real_counts(model: transcriptformer.TranscriptFormerModel, cells) -> np.ndarray:
    """The real cells as the model sees them (after clipping), over the vocabulary's genes."""
    batch = cells.batch(np.arange(len(cells)))
    vocab = model.checkpoint.gene_vocab
    dense = np.zeros((len(cells), len(vocab)))
    np.put_along_axis(dense, batch.gene_tokens.numpy(), batch.gene_counts.numpy(), axis=1)
    return dense[:, len(vocab.special_tokens) :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "images" / "generate_real_vs_generated.png")
    args = parser.parse_args()
    threads = use_cpu_threads()
    model = transcriptformer.load(REPO / "models" / "demo-mouse-brain", device="cpu")
    cells = model.tokenize(REPO / "test" / "data" / "demo_mouse_brain_heldout.h5ad", drop_empty_cells=True)
    real = real_counts(model, cells)
    start = time.perf_counter()
    adata = model.generate(cells, seed=args.seed)
    seconds = time.perf_counter() - start
    generated = adata.X.toarray()
    n_genes = int((generated > 0).sum())
    print(f"{adata.n_obs} cells, {n_genes} genes in {seconds:.1f} s on {threads} CPU thread(s): "
          f"{adata.n_obs / seconds:.1f} cells/s, {n_genes / seconds:.0f} genes/s")  # fmt: skip
    stats = {"genes per cell": lambda x: (x > 0).sum(1), "total count": lambda x: x.sum(1)}
    for name, statistic in stats.items():
        r, g = np.median(statistic(real)), np.median(statistic(generated))
        print(f"median {name}: real {r:g}, generated {g:g} ({100 * (g / r - 1):+.1f}%)")
    top = np.argsort(-real.mean(0))[:50]
    r_top = np.corrcoef(real.mean(0)[top], generated.mean(0)[top])[0, 1]
    r_all = np.corrcoef(real.mean(0), generated.mean(0))[0, 1]
    print(f"Pearson r of mean counts: top 50 real genes {r_top:.3f}, all genes {r_all:.3f}")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, statistic) in zip(axes, stats.items(), strict=False):
        bins = np.histogram_bin_edges(np.concatenate([statistic(real), statistic(generated)]), 20)
        ax.hist(statistic(real), bins=bins, alpha=0.6, label="real")
        ax.hist(statistic(generated), bins=bins, alpha=0.6, label="generated")
        ax.set_xlabel(name)
        ax.set_ylabel("cells")
        ax.legend()
    axes[2].scatter(real.mean(0), generated.mean(0), s=6, alpha=0.5, label="all genes")
    axes[2].scatter(real.mean(0)[top], generated.mean(0)[top], s=12, label=f"top 50 (r = {r_top:.2f})")
    axes[2].set_xlabel("mean count, real cells")
    axes[2].set_ylabel("mean count, generated cells")
    axes[2].legend()
    fig.suptitle(f"Demo model: {adata.n_obs} generated vs real held-out mouse brain cells (seed {args.seed})")
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
