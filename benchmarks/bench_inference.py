"""Inference throughput of a random-weight checkpoint of a named size on cells with realistic gene counts.

Prints cells/s, tokens/s, achieved FLOP/s against this machine's measured matmul peak (same dtype) and peak
RSS. ``--compare-naive`` also runs, in the same process and on the same cells, the straightforward path
(every cell at full length, fixed batches in input order, the whole score matrix at once) and prints the
speed ratio and the largest difference between the two paths' outputs. ``--ab-repeats N`` (with a precision other
than 32) times the precision and float32 alternately, N times each in the same process, after one untimed pass of
each (which compiles what the precision compiles), and prints the speed ratios and the embedding error.

Examples::

    python benchmarks/bench_inference.py --size mid --cells 48 --compare-naive
    OMP_NUM_THREADS=2 python benchmarks/bench_inference.py --size mid --cells 16 --precision bf16 --ab-repeats 3
    python benchmarks/bench_inference.py --size sapiens --device cuda --precision bf16 --cells 2000 --batch-size 32
"""

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch

import transcriptformer
from transcriptformer.checkpoint import save_checkpoint
from transcriptformer.config import DataConfig, LossConfig, ModelConfig, PredictConfig, TranscriptFormerConfig
from transcriptformer.data.vocab import GeneVocab, write_embedding_table
from transcriptformer.model.transcriptformer import SpecialTokens, TranscriptFormer
from transcriptformer.pipeline import predict_batches

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "human_fulltranscriptome_559.h5ad"

SIZES = {
    "tiny": dict(num_layers=2, num_heads=4, embed_dim=64, model_dim=128, gene_head_hidden_dim=64, esm_dim=32),
    "mid": dict(num_layers=6, num_heads=8, embed_dim=512, model_dim=512, gene_head_hidden_dim=512, esm_dim=2560),
    "sapiens": dict(
        num_layers=12, num_heads=16, embed_dim=2048, model_dim=2048, gene_head_hidden_dim=2048, esm_dim=2560
    ),
}
SAPIENS_VOCAB = 23_829
DTYPES = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}
# The same precisions as named by PredictConfig (the batch loop then applies the same autocast).
PRECISION_NAMES = {"32": "32", "bf16": "bf16-mixed", "16": "16-mixed"}


def add_cli_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the scripts that time fresh command-line processes: the cells, the model size, the threads."""
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="real cells with raw counts, var['ensembl_id']")
    parser.add_argument("--size", default="mid")
    parser.add_argument("--seq-len", type=int, default=2047)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: unset)")


def environment_with_threads(threads: int | None) -> dict[str, str]:
    """The environment of this process, with ``OMP_NUM_THREADS`` set to ``threads`` when given."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def build_checkpoint(size: str, gene_ids: list[str], directory: Path, seq_len: int) -> Path:
    """Write a random-weight checkpoint whose vocabulary holds ``gene_ids`` (padded to the published size)."""
    shape = dict(SIZES[size])
    esm_dim = shape.pop("esm_dim")
    if size == "sapiens" and len(gene_ids) < SAPIENS_VOCAB:
        gene_ids = gene_ids + [f"ENSGFILL{i:011d}" for i in range(SAPIENS_VOCAB - len(gene_ids))]
    table_file = directory / "homo_sapiens_gene.h5"
    rng = np.random.default_rng(0)
    vectors = {gene: rng.standard_normal(esm_dim, dtype=np.float32) for gene in gene_ids}
    write_embedding_table(table_file, vectors)
    config = TranscriptFormerConfig(
        data_config=DataConfig(aux_cols=[], esm2_mappings=[table_file.name]),
        model_config=ModelConfig(seq_len=seq_len, **shape),
        loss_config=LossConfig(),
    )
    vocab = GeneVocab.build(config.data_config.special_tokens, gene_ids)
    torch.manual_seed(0)
    table = torch.randn(len(vocab), esm_dim)  # special-token rows random, gene rows those of the table file
    for gene, vector in vectors.items():
        table[vocab[gene]] = torch.from_numpy(vector)
    special = SpecialTokens(pad=vocab.special("[PAD]"), start=vocab.special("[START]"), end=vocab.special("[END]"))
    model = TranscriptFormer(config.model_config, config.loss_config, table, special, aux_vocabs={})
    return save_checkpoint(directory / size, config, model, {}, [table_file])


def select_cells(adata: ad.AnnData, n_cells: int, min_genes: int = 0) -> ad.AnnData:
    """``n_cells`` cells of ``adata`` (repeated in order when there are fewer) with at least ``2 x min_genes`` genes.

    Twice the sequence length leaves room for genes outside the vocabulary, so that such cells run at full length.
    """
    rows = np.flatnonzero(np.diff(adata.X.indptr) >= 2 * min_genes) if min_genes else np.arange(adata.n_obs)
    if len(rows) == 0:
        raise ValueError(f"no cell has {2 * min_genes} genes or more")
    selected = adata[np.resize(rows, n_cells)].copy()
    selected.obs_names_make_unique()
    return selected


def gene_ids_of(adata: ad.AnnData) -> list[str]:
    """The distinct Ensembl ids (without version) of ``var["ensembl_id"]``."""
    ids = adata.var["ensembl_id"].dropna().astype(str).str.split(".").str[0]
    return list(dict.fromkeys(ids))


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, width: int) -> float:
    """Best FLOP/s of a (4096 x width) @ (width x width) matmul on ``device`` in ``dtype``."""
    a = torch.randn(4096, width, device=device, dtype=dtype)
    b = torch.randn(width, width, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(10):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * 4096 * width * width / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_flops(config: ModelConfig, esm_dim: int, vocab: int, shapes: list[tuple[int, int]], keys) -> float:
    """Useful FLOPs of forward passes of ``(batch, length)`` shapes: matmuls only, causal attention counted once."""
    e, f, h = config.embed_dim, config.model_dim, config.gene_head_hidden_dim
    per_token = 2 * (esm_dim * e + e * e) + config.num_layers * 2 * (4 * e * e + 2 * e * f)
    if {"mu", "llh"} & set(keys):
        per_token += 2 * (esm_dim * e + e * e) + 2 * (2 * e * e // 2 + e // 2)
    if "gene_llh" in keys:
        per_token += 2 * (e * h + h * vocab)
    attention_per_pair = config.num_layers * 2 * 2 * e  # QK^T and PV over all heads
    return sum(b * n * per_token + b * n * (n + 1) / 2 * attention_per_pair for b, n in shapes)


def run(model, cells, args, naive: bool) -> tuple[float, list[tuple[int, int]], np.ndarray]:
    """Time one pass over ``cells``; returns seconds, the (batch, length) shapes run and the embeddings."""
    device = model.device
    keys = tuple(args.output_keys)
    autocast = torch.autocast(device.type, dtype=DTYPES[args.precision], enabled=args.precision != "32")
    shapes, rows_seen, embeddings = [], [], []
    synchronize(device)
    start = time.perf_counter()
    with autocast:
        if naive:
            for first in range(0, len(cells), args.batch_size):
                rows = np.arange(first, min(first + args.batch_size, len(cells)))
                batch = cells.batch(rows).to(device)
                out = model.model.predict(batch.gene_tokens, batch.gene_counts, batch.aux_tokens, keys)
                rows_seen.append(rows)
                embeddings.append(out["embeddings"].cpu().numpy())
                shapes.append(tuple(batch.gene_tokens.shape))
        else:
            settings = PredictConfig(keys, args.batch_size, args.max_tokens, PRECISION_NAMES[args.precision])
            for batch in predict_batches(model.model, cells, settings, device):
                rows_seen.append(batch.rows)
                embeddings.append(batch.outputs["embeddings"])
                shapes.append(tuple(batch.inputs.gene_tokens.shape))
    synchronize(device)
    seconds = time.perf_counter() - start
    order = np.argsort(np.concatenate(rows_seen))
    return seconds, shapes, np.concatenate(embeddings)[order]


def compare_with_float32(model, cells, args) -> None:
    """Time ``args.precision`` and float32 alternately (A/B/A/B); print cells/s, speed ratios and embedding error."""
    settings = {
        precision: argparse.Namespace(**{**vars(args), "precision": precision}) for precision in (args.precision, "32")
    }
    for precision_args in settings.values():  # untimed: compiles and warms up
        run(model, cells, precision_args, naive=False)
    speeds = {precision: [] for precision in settings}
    embeddings = {}
    for _ in range(args.ab_repeats):
        for precision, precision_args in settings.items():
            seconds, _, embeddings[precision] = run(model, cells, precision_args, naive=False)
            speeds[precision].append(len(cells) / seconds)
    ratios = np.array(speeds[args.precision]) / np.array(speeds["32"])
    error = np.linalg.norm(embeddings[args.precision] - embeddings["32"]) / np.linalg.norm(embeddings["32"])
    for precision, values in speeds.items():
        print(f"{precision}: " + ", ".join(f"{value:.2f}" for value in values) + " cells/s")
    print(
        f"{args.precision} / 32 speed: {', '.join(f'{r:.2f}' for r in ratios)} (median {np.median(ratios):.2f}x); "
        f"embedding error {error:.1e} (relative, Frobenius)"
    )


def report(label: str, cells, n_tokens, seconds: float, flops: float, peak: float, shapes) -> None:
    positions = sum(b * n for b, n in shapes)
    print(
        f"{label}: {len(cells) / seconds:.2f} cells/s, {n_tokens.sum() / seconds:.0f} tokens/s "
        f"({positions / seconds:.0f} positions/s incl. padding), {flops / seconds / 1e9:.1f} GFLOP/s useful = "
        f"{100 * flops / seconds / peak:.0f}% of the measured matmul peak"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="h5ad with raw counts and var['ensembl_id']")
    parser.add_argument("--cells", type=int, default=48, help="number of cells to run (taken from the start)")
    parser.add_argument(
        "--full-length", action="store_true", help="only cells with at least seq-len genes, repeated to --cells"
    )
    parser.add_argument("--seq-len", type=int, default=2047)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="32")
    parser.add_argument("--backend", choices=("auto", "flex", "chunked", "dense"), default="auto")
    parser.add_argument("--output-keys", nargs="+", default=["embeddings"])
    parser.add_argument("--compare-naive", action="store_true")
    parser.add_argument("--ab-repeats", type=int, default=0, help="alternate with float32 this many times each")
    args = parser.parse_args()

    device = torch.device(args.device)
    adata = ad.read_h5ad(args.data)
    adata = select_cells(adata, args.cells, args.seq_len) if args.full_length else adata[: args.cells].copy()
    gene_ids = gene_ids_of(adata)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(args.size, gene_ids, Path(tmp), args.seq_len)
        model = transcriptformer.load(path, device=device, attention_backend=args.backend)
    config = model.checkpoint.config.model_config
    esm_dim = SIZES[args.size]["esm_dim"]
    cells = model.tokenize(adata)
    n_tokens = cells.n_tokens()
    print(
        f"{args.size}: {config.num_layers} layers x {config.embed_dim} wide, vocab {len(model.checkpoint.gene_vocab)}, "
        f"seq_len {config.seq_len}; {len(cells)} cells, tokens per cell median {int(np.median(n_tokens))} "
        f"(max {n_tokens.max()}); device {device}, precision {args.precision}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    warm = cells.batch(np.arange(min(2, len(cells))))
    model.model.predict(
        warm.gene_tokens.to(device), warm.gene_counts.to(device), warm.aux_tokens.to(device), ("embeddings",)
    )

    peak = measured_matmul_peak(device, DTYPES[args.precision], config.embed_dim)
    print(f"measured matmul peak ({args.precision}): {peak / 1e9:.1f} GFLOP/s")
    vocab = len(model.checkpoint.gene_vocab)
    seconds, shapes, fast = run(model, cells, args, naive=False)
    flops = forward_flops(config, esm_dim, vocab, shapes, args.output_keys)
    report("length-aware", cells, n_tokens, seconds, flops, peak, shapes)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.ab_repeats and args.precision != "32":
        compare_with_float32(model, cells, args)
    if args.compare_naive:
        model.model.attention_backend = "dense"
        naive_seconds, naive_shapes, slow = run(model, cells, args, naive=True)
        naive_flops = forward_flops(config, esm_dim, vocab, naive_shapes, args.output_keys)
        report(
            f"naive (length {config.seq_len}, input order, dense scores)",
            cells,
            n_tokens,
            naive_seconds,
            naive_flops,
            peak,
            naive_shapes,
        )
        difference = np.abs(fast - slow).max() / np.abs(slow).max()
        print(
            f"speed-up {naive_seconds / seconds:.2f}x; largest embedding difference {difference:.1e} (relative to max)"
        )


if __name__ == "__main__":
    main()
