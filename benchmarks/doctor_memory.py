"""Inference memory of the published model sizes on a CUDA GPU: the numbers behind ``transcriptformer doctor``.

Prints the doctor's report for this machine, then builds each published architecture with random weights (nothing
is downloaded), runs batches of full-length cells through ``TranscriptFormer.predict`` under 16-bit autocast (the
inference default on CUDA) and reports, per model and output set: weight memory, peak activation memory per cell,
time per batch, the bytes per position per width / per vocabulary entry that ``doctor.py`` uses, and the batch
size the doctor suggests against the largest batch measured to fit.

    python benchmarks/doctor_memory.py
    python benchmarks/doctor_memory.py --models tf-sapiens --batch-sizes 1 8 --backend chunked
"""

from __future__ import annotations

import argparse
import time

import torch

from transcriptformer import doctor
from transcriptformer.config import LossConfig, ModelConfig
from transcriptformer.model.transcriptformer import SpecialTokens, TranscriptFormer

OUTPUT_SETS = {"embeddings": ("embeddings",), "all": ("embeddings", "llh", "gene_llh", "mu")}
GIB = 1 << 30


def build(model: doctor.PublishedModel, backend: str) -> TranscriptFormer:
    with torch.device("cuda"):
        net = TranscriptFormer(
            ModelConfig(),
            LossConfig(),
            gene_table=torch.randn(model.vocab_size, model.esm_width),
            special_tokens=SpecialTokens(pad=1, start=2, end=3),
            aux_vocabs={"assay": {"unknown": 0, "10x 3' v3": 1}},
            attention_backend=backend,
        )
    return net.eval()


def full_length_batch(batch: int, vocab_size: int, config: ModelConfig) -> tuple[torch.Tensor, ...]:
    tokens = torch.randint(7, vocab_size, (batch, config.seq_len), device="cuda")
    counts = torch.randint(1, 31, (batch, config.seq_len), device="cuda").float()
    return tokens, counts, torch.ones(batch, 1, dtype=torch.long, device="cuda")


def peak_bytes(net: TranscriptFormer, batch: int, vocab_size: int, keys: tuple[str, ...]) -> tuple[int, float]:
    """Peak memory above the resident weights for one predict call, and its time (after a warm-up call)."""
    inputs = full_length_batch(batch, vocab_size, net.model_config)
    with torch.autocast("cuda", dtype=torch.float16):
        net.predict(*inputs, output_keys=keys)  # warm-up: compiles flex attention for this shape
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = net.predict(*inputs, output_keys=keys)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del out
    return torch.cuda.max_memory_allocated() - base, seconds


def run_suggested_batch(net: TranscriptFormer, model: doctor.PublishedModel, free_bytes: int, label: str) -> str:
    """Run the batch size the doctor suggests once; report whether it fit and the peak memory."""
    batch = doctor.suggested_batch_size(free_bytes, model, gene_llh=label == "all")
    inputs = full_length_batch(batch, model.vocab_size, net.model_config)
    torch.cuda.reset_peak_memory_stats()
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            out = net.predict(*inputs, output_keys=OUTPUT_SETS[label])
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return f"batch {batch}: out of memory"
    del out
    total = torch.cuda.mem_get_info()[1]
    return f"batch {batch}: fits, peak {torch.cuda.max_memory_allocated() / GIB:.1f} of {total / GIB:.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tf-sapiens", "tf-metazoa"], help="published sizes to measure")
    parser.add_argument("--batch-sizes", nargs=2, type=int, default=[1, 4], help="two batch sizes to difference")
    parser.add_argument("--backend", default="auto", help="attention backend: auto (flex on CUDA) or chunked")
    parser.add_argument("--verify", action="store_true", help="also run the batch size the doctor suggests")
    parser.add_argument("--skip-doctor", action="store_true", help="do not print the doctor's report first")
    args = parser.parse_args()

    if not args.skip_doctor:
        findings, code = doctor.run_doctor(check_flex=True)
        print(doctor.format_findings(findings), f"\n(doctor exit code {code})\n", flush=True)

    config = ModelConfig()
    positions = config.seq_len + config.aux_len
    small, large = args.batch_sizes
    free_at_start = torch.cuda.mem_get_info()[0]
    for model in (m for m in doctor.PUBLISHED_MODELS if m.name in args.models):
        before = torch.cuda.memory_allocated()
        net = build(model, args.backend)
        weights = torch.cuda.memory_allocated() - before
        print(
            f"{model.name}: V={model.vocab_size:,}  weights {weights / GIB:.2f} GiB "
            f"(doctor.weight_bytes {doctor.weight_bytes(model) / GIB:.2f} GiB)",
            flush=True,
        )
        per_cell = {}
        for label, keys in OUTPUT_SETS.items():
            (p_small, t_small), (p_large, t_large) = (
                peak_bytes(net, b, model.vocab_size, keys) for b in (small, large)
            )
            per_cell[label] = (p_large - p_small) / (large - small)
            fixed = p_small - small * per_cell[label]
            predicted = doctor.bytes_per_cell(model, gene_llh=label == "all")
            fits = int((free_at_start * doctor.MEMORY_HEADROOM - weights - fixed) // per_cell[label])
            suggested = doctor.suggested_batch_size(free_at_start, model, gene_llh=label == "all")
            print(
                f"  outputs={label:<10} per cell {per_cell[label] / GIB:6.3f} GiB (doctor {predicted / GIB:6.3f})"
                f"  fixed {fixed / 2**20:7.1f} MiB  batch {large}: {t_large * 1e3:7.1f} ms "
                f"({large / t_large:6.1f} cells/s)  fits {fits}, doctor suggests {suggested}",
                flush=True,
            )
        width_coeff = per_cell["embeddings"] / (positions * config.embed_dim)
        vocab_coeff = (per_cell["all"] - per_cell["embeddings"]) / (positions * model.vocab_size)
        print(f"  bytes/position: {width_coeff:.2f} per width, {vocab_coeff:.2f} per vocabulary entry", flush=True)
        if args.verify:
            for label in OUTPUT_SETS:
                print(
                    f"  doctor's suggestion, outputs={label}: {run_suggested_batch(net, model, free_at_start, label)}"
                )
        print(flush=True)
        del net
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
