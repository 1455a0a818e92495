"""Time one expression-aware attention call per backend, to choose the CPU path.

Backends: ``chunked`` (blocks of query rows, causal keys only; the CPU default), ``dense`` (the whole score
matrix), ``flex-eager`` (FlexAttention without compiling) and ``flex-compiled`` (``torch.compile`` of
FlexAttention; its compile time is reported apart, and a second length checks that a new shape compiles).

Usage: ``python benchmarks/bench_attention.py [--batch 8 --heads 8 --length 1280 --head-dim 64] [--device cpu]``
"""

import argparse
import time

import torch
from torch.nn.attention.flex_attention import flex_attention

from transcriptformer.model.attention import build_attention_inputs, chunked_attend


def inputs_for(backend: str, batch: int, length: int, device: torch.device):
    """The same counts and padding (seeded) for every backend."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 30, (batch, length), generator=gen).float().to(device)
    lengths = torch.randint(length // 2, length + 1, (batch, 1), generator=gen).to(device)
    is_pad = torch.arange(length, device=device)[None, :] >= lengths
    kind = "flex" if backend.startswith("flex") else backend
    return build_attention_inputs(counts, is_pad, eps=1e-6, cap=10.0, embed_mode=True, backend=kind)


def best_time(call, repeats: int) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--length", type=int, default=1280)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = (args.batch, args.heads, args.length, args.head_dim)
    q, k, v = (torch.randn(shape, device=device) for _ in range(3))
    print(f"attention {shape} on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    reference = None
    compiled = torch.compile(flex_attention)
    for backend in ("chunked", "dense", "flex-eager", "flex-compiled"):
        inputs = inputs_for(backend, args.batch, args.length, device)
        if backend in ("chunked", "dense"):
            call = lambda inputs=inputs: chunked_attend(q, k, v, inputs)  # noqa: E731
        else:
            attend = compiled if backend == "flex-compiled" else flex_attention
            call = lambda inputs=inputs, attend=attend: attend(  # noqa: E731
                q, k, v, score_mod=inputs.score_mod, block_mask=inputs.block_mask
            )
        start = time.perf_counter()
        try:
            out = call()
        except Exception as err:  # report a backend that cannot run here and go on with the others
            print(f"{backend:14s} failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
            continue
        first = time.perf_counter() - start
        seconds = best_time(call, args.repeats)
        if reference is None:
            reference = out
        difference = (out - reference).abs().max().item()
        extra = f" (first call {first:.1f} s, incl. compiling)" if backend == "flex-compiled" else ""
        print(f"{backend:14s} {seconds * 1e3:8.1f} ms{extra}; max difference to chunked {difference:.1e}")

    other = inputs_for("flex", args.batch, args.length // 2 + 64, device)
    half = [t[:, :, : args.length // 2 + 64] for t in (q, k, v)]
    start = time.perf_counter()
    try:
        compiled(*half, score_mod=other.score_mod, block_mask=other.block_mask)
        print(f"flex-compiled, a second length: compiled and ran in {time.perf_counter() - start:.1f} s")
    except Exception as err:  # the point of this check is whether a new shape fails
        print(f"flex-compiled, a second length: failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")


if __name__ == "__main__":
    main()
