"""TF-Sapiens-shape inference and pretraining speed on a GPU, with the number of compilations; one summary block.

On a CUDA machine (about 5 minutes on one H200, most of it writing and loading the 1.7 GB random checkpoint)::

    python benchmarks/gpu_sapiens.py

On any machine, a tiny shape in about two minutes; the CUDA-only parts say that they are skipped::

    python benchmarks/gpu_sapiens.py --smoke

1. Inference at the TF-Sapiens shape (12 layers, 2,048 wide, 16 heads, 2,047 genes, vocabulary 23,829; a
   random-weight checkpoint from ``bench_inference.build_checkpoint``) on real cells resampled to ``--cells``, in
   bf16-mixed with compiled FlexAttention and the model's cached block masks: the time to the first batch
   (compilation included), then cells/s of a second pass over the same cells, and the compilations of each pass.
   The same again at full length (every cell 2,047 genes) when the data holds such cells.
2. Pretraining: ``transcriptformer train``'s own run (the ``conf/demo.yaml`` recipe: 4 layers x 128, up to 511
   genes, batches rounded to 128 positions on a GPU, so their lengths vary) for ``--train-steps`` optimizer steps:
   the first step (compilation included), the median step after the last compilation, steps/s, the compilations
   during training and validation, and the batch shapes seen.
3. Without a GPU: the training step's attention compiled on the CPU (inductor; torch has no FlexAttention
   backward on the CPU, so forward passes without gradients) over real training batches trimmed to their longest
   cell, a new length nearly every batch: the number of compilations.

``--data`` takes any h5ad with raw counts and ``var["ensembl_id"]``; by default the whole-transcriptome cells of
``../shared/data/human_fulltranscriptome_559.h5ad`` when present, else ``test/data/pbmc3k_counts.h5ad`` (a
2,000-gene panel: no cell reaches 2,047 genes, so the full-length figure is skipped).
"""

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import torch
from bench_inference import SIZES, build_checkpoint, gene_ids_of, select_cells, synchronize
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import transcriptformer
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.config import PredictConfig
from transcriptformer.data.tokenize import Batch
from transcriptformer.model.attention import MultiHeadSelfAttention, compiled_flex_attention
from transcriptformer.pipeline import predict_batches
from transcriptformer.training.config import DataSettings, compose_train_config
from transcriptformer.training.objective import training_loss
from transcriptformer.training.run import build_datamodule, run_pretraining

REPO = Path(__file__).resolve().parents[1]
DATA_CHOICES = (
    REPO.parent / "shared" / "data" / "human_fulltranscriptome_559.h5ad",
    REPO / "shared" / "data" / "human_fulltranscriptome_559.h5ad",
    REPO / "test" / "data" / "pbmc3k_counts.h5ad",
)
DEMO_MODEL = REPO / "models" / "demo-mouse-brain"
DEMO_CELLS = REPO / "test" / "data" / "mouse_brain_1k.h5ad"


def compiled_graphs() -> int:
    """Graphs compiled by ``torch.compile`` in this process so far."""
    return counters["stats"]["unique_graphs"]


def timed_pass(model: transcriptformer.TranscriptFormerModel, cells, settings: PredictConfig) -> dict[str, float]:
    """One pass of the batch loop over ``cells``: seconds to the first batch and in all, graphs compiled."""
    device = model.device
    graphs = compiled_graphs()
    synchronize(device)
    start = time.perf_counter()
    first = None
    for _ in predict_batches(model.model, cells, settings, device):
        if first is None:
            synchronize(device)
            first = time.perf_counter() - start
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"first": first, "seconds": seconds, "cells/s": len(cells) / seconds, "graphs": compiled_graphs() - graphs}


def inference(args: argparse.Namespace, device: torch.device, lines: list[str]) -> None:
    """Part 1: time to the first batch and steady cells/s at the chosen shape, real and full-length cells."""
    data = ad.read_h5ad(args.data)
    seq_len = args.seq_len
    precision = "bf16-mixed" if device.type == "cuda" else "32"
    settings = PredictConfig(("embeddings",), args.batch_size, args.max_tokens, precision)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = build_checkpoint(args.size, gene_ids_of(data), Path(tmp), seq_len)
        model = transcriptformer.load(path, device=device)
        built = time.perf_counter() - start
    config = model.checkpoint.config.model_config
    lines.append(
        f"inference: {args.size} shape ({config.num_layers} layers x {config.embed_dim}, {config.num_heads} heads, "
        f"seq_len {config.seq_len}, vocabulary {len(model.checkpoint.gene_vocab)}), {precision}, backend "
        f"{'compiled flex' if device.type == 'cuda' else 'chunked (no CUDA: compiled FlexAttention skipped)'}; "
        f"checkpoint written and loaded in {built:.0f} s; cells from {args.data.name}"
    )
    runs = [("real cells", select_cells(data, args.cells))]
    try:
        runs.append(("full length", select_cells(data, args.cells, seq_len)))
    except ValueError as error:
        lines.append(f"  full length: skipped, {error} in {args.data.name}")
    for label, adata in runs:
        cells = model.tokenize(adata)
        first = timed_pass(model, cells, settings)
        steady = timed_pass(model, cells, settings)
        lines.append(
            f"  {label}: {len(cells)} cells, median {int(np.median(cells.n_tokens()))} genes; first batch after "
            f"{first['first']:.1f} s (compiling included), first pass {first['seconds']:.1f} s with "
            f"{first['graphs']} compilation(s); steady {steady['cells/s']:.1f} cells/s ({steady['graphs']} more)"
        )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


class StepTimer(L.Callback):
    """Wall time, batch shape and compilations of every training step, and of each validation."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.validations: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch: Batch, batch_idx: int) -> None:
        """Start the step's clock."""
        synchronize(pl_module.device)
        self._start = (time.perf_counter(), compiled_graphs())
        self._shape = tuple(batch.gene_tokens.shape)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Batch, batch_idx: int) -> None:
        """Record the step."""
        self.steps.append(self._finish(pl_module) | {"shape": self._shape})

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        """Start the validation's clock."""
        synchronize(pl_module.device)
        self._start = (time.perf_counter(), compiled_graphs())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """Record the validation."""
        self.validations.append(self._finish(pl_module))

    def _finish(self, pl_module) -> dict:
        synchronize(pl_module.device)
        start, graphs = self._start
        return {"seconds": time.perf_counter() - start, "graphs": compiled_graphs() - graphs}


def pretraining(args: argparse.Namespace, device: torch.device, lines: list[str]) -> None:
    """Part 2: ``transcriptformer train`` (the demo recipe) for a few dozen optimizer steps."""
    precision = "bf16-mixed" if device.type == "cuda" else "32"
    torch.compiler.reset()  # compile afresh, as a new `transcriptformer train` process does
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"output_dir={tmp}/model",
            f"trainer.run_dir={tmp}/run",
            f"trainer.devices={'1' if device.type == 'cuda' else 'cpu'}",
            f"trainer.precision={precision}",
            f"trainer.max_steps={args.train_steps}",
            "trainer.max_epochs=-1",
            "trainer.early_stopping_patience=0",
            f"data.train_files=[{DEMO_CELLS}]",
            f"data_config.esm2_mappings=[{REPO / 'test/data/reference_tiny/vocabs/mus_musculus_gene.h5'}]",
        ]
        cfg = compose_train_config(REPO / "conf" / "demo.yaml", overrides)
        start = time.perf_counter()
        run_pretraining(cfg, callbacks=[timer])
        total = time.perf_counter() - start
    steps = timer.steps
    compiling = [i for i, step in enumerate(steps) if step["graphs"]]
    settled = steps[compiling[-1] + 1 :] if compiling else steps[1:]
    median = statistics.median(step["seconds"] for step in settled) if settled else float("nan")
    shapes = sorted({step["shape"] for step in steps})
    lines.append(
        f"pretraining: conf/demo.yaml recipe, {precision}, "
        f"{'compiled flex' if device.type == 'cuda' else 'chunked (no CUDA: compiled FlexAttention skipped)'}; "
        f"{len(steps)} optimizer steps in {total:.1f} s (whole run: data, model, validation, checkpoint)"
    )
    lines.append(
        f"  first step {steps[0]['seconds']:.2f} s; median step after the last compilation {median * 1e3:.1f} ms "
        f"({1 / median:.1f} steps/s over {len(settled)} steps)"
    )
    validations = ", ".join(f"{v['seconds']:.1f} s" for v in timer.validations)
    lines.append(
        f"  compilations: {sum(step['graphs'] for step in steps)} in training steps (at steps {compiling}), "
        f"{sum(v['graphs'] for v in timer.validations)} in {len(timer.validations)} validation(s) ({validations})"
    )
    lines.append(f"  {len(shapes)} batch shapes (cells x genes): {', '.join(f'{b}x{n}' for b, n in shapes)}")


def attention_compilations(model, batches: Iterable[Batch], backend: str) -> tuple[int, list[tuple[int, int]]]:
    """Compilations of the training step's attention over ``batches``, compiled with ``torch.compile`` ``backend``.

    Runs ``model``'s training-mode forward pass (dropout on, no count bias on the diagonal) without gradients on
    the CPU; each attention layer's queries, keys and values, count bias and block mask also go through
    :func:`~transcriptformer.model.attention.compiled_flex_attention` as they do on a GPU. Compilation state is
    reset first.

    Returns
    -------
    int, list of (int, int)
        Compilations, and the (cells, positions) shape of each batch.
    """
    torch.compiler.reset()
    counter = CompileCounterWithBackend(backend)
    attend = compiled_flex_attention(counter)

    def compile_attention(module: MultiHeadSelfAttention, args: tuple) -> None:
        x, inputs = args[:2]
        attend(*module.project(x), score_mod=inputs.score_mod, block_mask=inputs.block_mask)

    layers = [m for m in model.modules() if isinstance(m, MultiHeadSelfAttention)]
    hooks = [layer.register_forward_pre_hook(compile_attention) for layer in layers]
    shapes = []
    try:
        with torch.no_grad():
            for batch in batches:
                training_loss(model.train(), batch)
                shapes.append(tuple(batch.gene_tokens.shape))
    finally:
        for hook in hooks:
            hook.remove()
    return counter.frame_count, shapes


def training_batches(n_batches: int, batch_size: int = 16) -> tuple[torch.nn.Module, list[Batch]]:
    """The demo model with the flex backend, and its first training batches trimmed to their longest cell."""
    checkpoint = load_checkpoint(DEMO_MODEL, attention_backend="chunked")  # exact trimming: many lengths
    data = build_datamodule(checkpoint, DataSettings(train_files=[str(DEMO_CELLS)], batch_size=batch_size), seed=0)
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(n_batches)]
    checkpoint.model.attention_backend = "flex"
    return checkpoint.model, batches


def cpu_compilations(args: argparse.Namespace, lines: list[str]) -> None:
    """Part 3: compilations of the training step's attention on the CPU over batches of many lengths."""
    model, batches = training_batches(args.compile_batches)
    start = time.perf_counter()
    graphs, shapes = attention_compilations(model, batches, "inductor")
    lengths = sorted({n for _, n in shapes})
    lines.append(
        f"CPU compilation check (inductor, forward only): {len(shapes)} training batches of the demo model, "
        f"{len(lengths)} lengths ({lengths[0]}-{lengths[-1]}), sizes {sorted({b for b, _ in shapes})}: "
        f"{graphs} compilation(s) in {time.perf_counter() - start:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shape, few cells and steps (for a CPU check)")
    parser.add_argument("--data", type=Path, default=next(p for p in DATA_CHOICES if p.exists()))
    parser.add_argument("--size", choices=sorted(SIZES), default="sapiens")
    parser.add_argument("--cells", type=int, default=2000, help="real cells, resampled when the file has fewer")
    parser.add_argument("--seq-len", type=int, default=2047)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=131_072, help="token budget per batch")
    parser.add_argument("--train-steps", type=int, default=60, help="pretraining steps (one demo epoch is 57)")
    parser.add_argument("--compile-batches", type=int, default=12, help="batches of the CPU compilation check")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.cells, args.seq_len, args.batch_size, args.max_tokens = "tiny", 32, 511, 8, None
        args.train_steps = 8
    os.environ.setdefault("TRANSCRIPTFORMER_VERBOSITY", "quiet")  # no progress bars between the figures
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "no CUDA device"
    lines = [f"torch {torch.__version__}, {name}, {torch.get_num_threads()} CPU threads"]
    inference(args, device, lines)
    pretraining(args, device, lines)
    if device.type == "cpu":
        cpu_compilations(args, lines)
    else:
        lines.append("CPU compilation check: skipped on a GPU (part 2 counts the compilations of real training)")
    print("\n".join(["", "=== gpu_sapiens summary ===", *lines, "==="]))


if __name__ == "__main__":
    main()
