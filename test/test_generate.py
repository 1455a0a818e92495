"""Generating cells: the key/value cache, the sampling rules, prompts and targets, the output, the statistics.

The trained demo model (models/demo-mouse-brain) generates from the bundled held-out mouse brain cells.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import transcriptformer
from conftest import DATA_DIR, REFERENCE_DIR
from test_user_errors import assert_one_line_error, run_cli
from transcriptformer.cli import main
from transcriptformer.model.sampling import sample_zero_truncated_poisson, zero_truncated_poisson_probabilities
from transcriptformer.tasks.generate import GENERATION_ORDER

DEMO_MODEL = DATA_DIR.parent.parent / "models" / "demo-mouse-brain"
HELDOUT = DATA_DIR / "demo_mouse_brain_heldout.h5ad"


@pytest.fixture(scope="module")
def demo() -> transcriptformer.TranscriptFormerModel:
    return transcriptformer.load(DEMO_MODEL, device="cpu")


@pytest.fixture(scope="module")
def prompt_cells(demo):
    return demo.tokenize(HELDOUT, drop_empty_cells=True)


def sequences(adata: ad.AnnData) -> list[list[tuple[str, float]]]:
    """Each cell's (gene id, count) pairs in the order they were generated."""
    result = []
    for i in range(adata.n_obs):
        order = adata.layers[GENERATION_ORDER][i]
        counts = adata.X[i]
        ranked = order.indices[np.argsort(order.data)]
        values = dict(zip(counts.indices, counts.data, strict=True))
        result.append([(adata.var_names[j], float(values[j])) for j in ranked])
    return result


@pytest.mark.parametrize("checkpoint", [DEMO_MODEL, REFERENCE_DIR])
def test_decoding_with_the_cache_equals_the_full_forward_pass(checkpoint):
    model = transcriptformer.load(checkpoint, device="cpu")
    cells = model.tokenize(HELDOUT if checkpoint == DEMO_MODEL else REFERENCE_DIR / "input.h5ad")
    batch = cells.batch(np.arange(6), 40)
    net = model.model
    with torch.no_grad():
        full = net(batch.gene_tokens, batch.gene_counts, batch.aux_tokens, compute_mu=False, compute_gene_logits=False)
        cache, hidden = net.start_decoding(batch.aux_tokens, 6, 40)
        stepped = [hidden] + [net.decode(batch.gene_tokens[:, i], batch.gene_counts[:, i], cache) for i in range(39)]
    torch.testing.assert_close(torch.stack(stepped, 1), full.hidden, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "top_k": 50, "top_p": 0.9}])
def test_cached_and_uncached_generation_give_the_same_cells(prompt_cells, sampling):
    """The same cells, in float64.

    In float32 the two paths' logits differ by ~3e-6 (other matmul shapes), and once in a few thousand draws a
    uniform number falls between their cumulative sums (measured: seed 3, one thread).
    """
    demo64 = transcriptformer.load(DEMO_MODEL, device="cpu")
    demo64.model.double()
    settings = {"num_cells": 6, "max_genes": 40, "seed": 3, "prompt_genes": 2} | sampling
    cached = demo64.generate(HELDOUT, **settings)
    uncached = demo64.generate(HELDOUT, use_cache=False, **settings)
    assert sequences(cached) == sequences(uncached)
    assert cached.obs["num_genes"].min() > 10


def test_a_cell_depends_on_the_seed_and_its_index_not_the_batch(demo, prompt_cells):
    whole = demo.generate(HELDOUT, num_cells=9, max_genes=30, seed=1, batch_size=9)
    split = demo.generate(HELDOUT, num_cells=9, max_genes=30, seed=1, batch_size=4)
    other_seed = demo.generate(HELDOUT, num_cells=9, max_genes=30, seed=2, batch_size=9)
    assert sequences(whole) == sequences(split)
    assert all(a != b for a, b in zip(sequences(whole), sequences(other_seed), strict=True))


def test_generated_cells_follow_the_sampling_rules(demo, prompt_cells):
    vocab = demo.checkpoint.gene_vocab
    adata = demo.generate(HELDOUT, num_cells=12, seed=0)
    clip = demo.checkpoint.config.data_config.clip_counts
    for cell in sequences(adata):
        genes = [gene for gene, _ in cell]
        assert len(set(genes)) == len(genes)  # a gene is emitted once
        assert all(gene not in vocab.special_tokens for gene in genes)
        assert all(1 <= count <= clip and count == int(count) for _, count in cell)
    # No [END] was drawn (the model never learned to stop early), so each cell reaches its target.
    assert (adata.obs["num_genes"] == adata.obs["target_num_genes"]).all()
    assert (adata.obs["total_counts"] == np.asarray(adata.X.sum(1)).ravel()).all()


def test_greedy_sampling_takes_the_most_likely_gene(demo):
    net = demo.model
    adata = demo.generate(num_cells=1, num_genes=1, library_size=2, top_k=1, aux={"assay": "MERFISH"})
    with torch.no_grad():
        _, hidden = net.start_decoding(torch.tensor([[demo.checkpoint.aux_vocabs["assay"]["MERFISH"]]]), 1, 1)
        logits = net.next_gene_logits(hidden)[0]
    logits[: len(demo.checkpoint.gene_vocab.special_tokens)] = -torch.inf
    expected = demo.checkpoint.gene_vocab.gene_ids[
        int(logits.argmax()) - len(demo.checkpoint.gene_vocab.special_tokens)
    ]
    assert sequences(adata)[0][0][0] == expected
    nucleus = demo.generate(num_cells=1, num_genes=1, library_size=2, top_p=1e-6, aux={"assay": "MERFISH"})
    assert sequences(nucleus)[0][0][0] == expected


def test_prompts_and_targets(demo, prompt_cells):
    first = prompt_cells.batch([0])
    n_genes = int((first.gene_tokens != demo.model.special_tokens.pad).sum())
    adata = demo.generate(HELDOUT, num_cells=1, prompt_genes=5)
    ids = demo.checkpoint.gene_vocab.gene_ids
    n_special = len(demo.checkpoint.gene_vocab.special_tokens)
    prompt = [
        (ids[int(t) - n_special], float(c))
        for t, c in zip(first.gene_tokens[0, :5], first.gene_counts[0, :5], strict=True)
    ]
    assert sequences(adata)[0][:5] == prompt
    assert adata.obs["num_genes"].iloc[0] == n_genes == adata.obs["target_num_genes"].iloc[0]
    assert adata.obs["target_library_size"].iloc[0] == pytest.approx(float(first.gene_counts.sum()))
    assert adata.obs["prompt_cell"].iloc[0] == prompt_cells.obs_names[0]
    # A gene list (symbols) starts every cell in its order; max_genes caps the cell, scaling its total.
    listed = demo.generate(HELDOUT, num_cells=3, genes=["Crym", "Vgf"], max_genes=10)
    symbols = ["ENSMUSG00000030905", "ENSMUSG00000037428"]  # Crym, Vgf
    assert all([gene for gene, _ in cell[:2]] == symbols for cell in sequences(listed))
    assert (listed.obs["num_genes"] == 10).all()
    capped = listed.obs["target_library_size"] / 10
    uncapped = np.array([float(prompt_cells.batch([i]).gene_counts.sum()) for i in range(3)])
    genes = np.array([int((prompt_cells.batch([i]).gene_tokens != 1).sum()) for i in range(3)])
    np.testing.assert_allclose(capped, uncapped / genes)


def test_zero_truncated_poisson_sampler_matches_its_distribution():
    rate = torch.full((20000,), 2.5, dtype=torch.float64)
    uniforms = torch.from_numpy(np.random.default_rng(0).random(20000))
    counts = sample_zero_truncated_poisson(rate, 30, uniforms)
    assert counts.min() >= 1 and counts.max() <= 30
    assert float(counts.mean()) == pytest.approx(2.5 / (1 - np.exp(-2.5)), rel=0.02)
    clipped = zero_truncated_poisson_probabilities(torch.tensor([40.0]), 30)
    assert float(clipped.sum()) == pytest.approx(1.0) and float(clipped[0, -1]) > 0.9  # the tail sits at the clip


def test_generated_cells_resemble_the_real_ones(demo, prompt_cells):
    """Issue 12 item 4: medians of genes and total counts within 20%, top-50 gene means correlate (r > 0.5)."""
    batch = prompt_cells.batch(np.arange(len(prompt_cells)))
    n_special = len(demo.checkpoint.gene_vocab.special_tokens)
    real = np.zeros((len(prompt_cells), len(demo.checkpoint.gene_vocab)))
    np.put_along_axis(real, batch.gene_tokens.numpy(), batch.gene_counts.numpy(), axis=1)
    real = real[:, n_special:]
    generated = demo.generate(HELDOUT, seed=0).X.toarray()
    for statistic in (lambda x: (x > 0).sum(1), lambda x: x.sum(1)):
        assert np.median(statistic(generated)) == pytest.approx(np.median(statistic(real)), rel=0.2)
    top = np.argsort(-real.mean(0))[:50]
    assert np.corrcoef(real.mean(0)[top], generated.mean(0)[top])[0, 1] > 0.5


def test_the_cli_writes_cells_that_scanpy_and_inference_read(tmp_path, capsys):
    import scanpy as sc

    out = tmp_path / "out"
    args = ["generate", "--checkpoint-path", DEMO_MODEL, "--data-file", HELDOUT, "--num-cells", 8]
    assert main([str(a) for a in [*args, "--output-path", out, "--max-genes", 40]]) == 0
    assert f"Output: {(out / 'generated.h5ad').resolve()}" in capsys.readouterr().out
    adata = ad.read_h5ad(out / "generated.h5ad")
    assert adata.shape == (8, len(transcriptformer.load(DEMO_MODEL, device="cpu").checkpoint.gene_vocab.gene_ids))
    assert sp.issparse(adata.X) and json.loads(adata.uns["transcriptformer"]["task"])["settings"]["seed"] == 0
    assert set(adata.obs["assay"]) == {"MERFISH"}
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    assert main(["inference", "--checkpoint-path", str(DEMO_MODEL), "--data-file", str(out / "generated.h5ad"),
                 "--output-path", str(tmp_path / "scored"), "--output-keys", "log_likelihood"]) == 0  # fmt: skip
    scored = ad.read_h5ad(tmp_path / "scored" / "embeddings.h5ad")
    assert np.isfinite(scored.obs["log_likelihood"]).all()


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--num-cells", "2"], ["--library-size"]),
        (["--library-size", "10"], ["--num-cells"]),
        (["--num-cells", "2", "--library-size", "10", "--genes", "NotAGene1"], ["NotAGene1"]),
        (["--num-cells", "2", "--library-size", "10", "--aux", "assay=nope"], ["assay", "nope", "MERFISH"]),
        (["--num-cells", "2", "--library-size", "10", "--aux", "assay"], ["COLUMN=VALUE"]),
        (["--num-cells", "2", "--library-size", "10", "--max-genes", "100000"], ["--max-genes", "seq_len"]),
        (["--num-cells", "2", "--library-size", "10", "--top-p", "0"], ["--top-p"]),
        (["--num-cells", "2", "--prompt-genes", "3"], ["--data-file"]),
    ],
)
def test_mistakes_are_one_line_errors(tmp_path, capsys, flags, words):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "generate", "--checkpoint-path", DEMO_MODEL, "--output-path", out, *flags)
    assert_one_line_error(code, err, "generate", *words)
    assert not list(Path(tmp_path).rglob("*.h5ad"))


def test_a_cell_that_draws_end_stops_while_the_others_go_on(demo):
    """[END] (here forced through a prompt, since the demo model does not draw it) ends only its own cell."""
    from transcriptformer.model.generate import Prompt, Sampler, generate_cells

    net, vocab = demo.model, demo.checkpoint.gene_vocab
    first_genes = [vocab[gene] for gene in vocab.gene_ids[:2]]
    tokens = torch.tensor([[*first_genes, net.special_tokens.end], [*first_genes, net.special_tokens.pad]])
    excluded = torch.zeros(len(vocab), dtype=torch.bool)
    excluded[: len(vocab.special_tokens)] = True
    result = generate_cells(
        net,
        torch.zeros(2, 1, dtype=torch.long),
        torch.tensor([10, 10]),
        torch.tensor([20.0, 20.0]),
        [np.random.default_rng([0, i]) for i in range(2)],
        excluded,
        sampler=Sampler(1.0, 0, 1.0),
        max_count=30.0,
        prompt=Prompt(tokens, torch.full(tokens.shape, float("nan"))),
    )
    pad = net.special_tokens.pad
    assert result.ended.tolist() == [True, False]
    assert (result.tokens[0] != pad).sum() == 2 and (result.counts[0, 2:] == 0).all()
    assert (result.tokens[1] != pad).sum() == 10


def generate_command(output: Path, *extra, prompts: Path = HELDOUT) -> list[str]:
    args = ["generate", "--checkpoint-path", DEMO_MODEL, "--data-file", prompts, "--output-path", output,
            "--max-genes", 12, "--batch-size", 2, "--chunk-size", 5, "--device", "cpu", *extra]  # fmt: skip
    return [sys.executable, "-m", "transcriptformer", *map(str, args)]


def assert_same_cells(adata: ad.AnnData, whole: ad.AnnData) -> None:
    assert adata.obs.equals(whole.obs)
    assert sequences(adata) == sequences(whole)


def test_units_of_the_file_run_generate_the_cells_of_the_in_memory_run(demo, tmp_path):
    """Cells past the last of 4 prompt cells wrap around to the first, across units of 5 cells; the same cells."""
    prompts = tmp_path / "prompts.h5ad"
    ad.read_h5ad(HELDOUT)[:4].copy().write_h5ad(prompts)
    assert main(generate_command(tmp_path, "--num-cells", 11, prompts=prompts)[3:]) == 0
    written = ad.read_h5ad(tmp_path / "generated.h5ad")
    in_memory = demo.generate(prompts, num_cells=11, max_genes=12, batch_size=3)
    assert_same_cells(written, in_memory)
    names = ad.read_h5ad(prompts).obs_names
    assert list(written.obs["prompt_cell"]) == [names[i % 4] for i in range(11)]
    assert (written.X != written.layers["counts"]).nnz == 0


@pytest.mark.slow  # three fresh processes
def test_generate_resumes_and_runs_in_two_processes_as_one_run(tmp_path):
    from test_inference_resume import kill_after_some_units

    extra = ["--num-cells", "40", "--batch-size", "1"]
    assert main(generate_command(tmp_path / "whole", *extra)[3:]) == 0
    whole = ad.read_h5ad(tmp_path / "whole" / "generated.h5ad")
    parts = tmp_path / "resumed" / ".generated.h5ad.parts"
    kill_after_some_units(generate_command(tmp_path / "resumed", *extra), parts)
    done = len(list(parts.glob("unit-*.npz")))
    resumed = subprocess.run(generate_command(tmp_path / "resumed", *extra, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming: {done} of 8 units were already done" in resumed.stdout
    assert_same_cells(ad.read_h5ad(tmp_path / "resumed" / "generated.h5ad"), whole)
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    two = subprocess.run(
        generate_command(tmp_path / "two", *extra, "--num-gpus", "2"), capture_output=True, text=True, env=env
    )
    assert two.returncode == 0, two.stderr
    assert_same_cells(ad.read_h5ad(tmp_path / "two" / "generated.h5ad"), whole)


def test_a_gene_given_as_a_string_is_one_gene(demo):
    one = demo.generate(num_cells=2, num_genes=3, library_size=6, genes="Crym", aux={"assay": "MERFISH"})
    assert all(cell[0][0] == "ENSMUSG00000030905" for cell in sequences(one))
