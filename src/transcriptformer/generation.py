"""Sample cells from a checkpoint: ``transcriptformer generate`` and ``TranscriptFormerModel.generate``.

Each generated cell has targets and conditions (docs/generate.md):

* its aux values (the assay): those of its prompt cell, or ``--aux COLUMN=VALUE``, else unknown (masked);
* its number of genes ``N`` and total count ``T`` (on the model's input scale, after clipping), which the count
  rule of :mod:`transcriptformer.model.generate` needs: those of its prompt cell, or ``num_genes`` (default
  ``max_genes``) and ``library_size``. ``max_genes`` caps ``N``; ``T`` is then scaled by the same factor;
* optionally the genes it starts with: the first ``prompt_genes`` genes and counts of its prompt cell, or a gene
  list whose counts are drawn.

Generated cell ``i`` uses prompt cell ``i mod n`` of the ``n`` prompt cells, and draws its random numbers from
``numpy.random.default_rng([seed, i])``: the same cell for the same seed, whatever the batch size.

The result is an AnnData of raw integer counts over the vocabulary's genes (``var`` indexed by gene id, with the
checkpoint's gene column, so that it can be fed back to ``inference`` or ``score``), ``layers["generation_order"]``
(1 for the first gene generated, 2 for the second, ...), and per cell in ``obs``: the prompt cell, the aux values,
the seed, the targets, the number of genes and total count generated, and whether the model emitted ``[END]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from transcriptformer.checkpoint import Checkpoint
from transcriptformer.config import GenerateSettings
from transcriptformer.console import progress_bar
from transcriptformer.data.gene_symbols import GeneNames
from transcriptformer.data.tokenize import TokenizedCells
from transcriptformer.errors import UserError
from transcriptformer.model.generate import Prompt, Sampler, generate_cells
from transcriptformer.version import __version__

GENERATION_ORDER = "generation_order"


@dataclasses.dataclass
class Plan:
    """What every generated cell starts from.

    Attributes
    ----------
    prompt_rows : ndarray
        ``(n,)`` row of each cell's prompt cell, ``-1`` without one.
    aux_tokens : ndarray
        ``(n, A)`` conditions.
    num_genes : ndarray
        ``(n,)`` target number of genes ``N`` (at most ``max_genes``).
    library_size : ndarray
        ``(n,)`` target total count ``T`` over those genes.
    prompt_tokens, prompt_counts : ndarray
        ``(n, P)`` forced genes (``[PAD]`` past a cell's prompt) and their counts (NaN: drawn).
    """

    prompt_rows: np.ndarray
    aux_tokens: np.ndarray
    num_genes: np.ndarray
    library_size: np.ndarray
    prompt_tokens: np.ndarray
    prompt_counts: np.ndarray


def plan_cells(
    checkpoint: Checkpoint,
    settings: GenerateSettings,
    prompt_cells: TokenizedCells | None = None,
    aux: Mapping[str, str] | None = None,
    genes: Sequence[str] = (),
) -> Plan:
    """The targets, conditions and prompts of every cell to generate (see the module docstring).

    Raises
    ------
    UserError
        When a setting is missing or contradicts another, a gene or an aux value is unknown.
    """
    seq_len, pad = checkpoint.model.seq_len, checkpoint.model.special_tokens.pad
    max_genes = settings.max_genes or seq_len
    if max_genes > seq_len:
        raise UserError(f"--max-genes {max_genes} is more than the model's seq_len {seq_len}; lower it")
    if settings.prompt_genes and prompt_cells is None:
        raise UserError("--prompt-genes takes the first genes of prompt cells: give them with --data-file")
    if settings.prompt_genes and genes:
        raise UserError("give either --prompt-genes (genes of the prompt cells) or --genes (a gene list), not both")
    n_cells = settings.num_cells or (len(prompt_cells) if prompt_cells is not None else None)
    if n_cells is None:
        raise UserError("say how many cells to generate: --num-cells N, or prompt cells with --data-file")
    if prompt_cells is None:
        if settings.library_size is None:
            raise UserError(
                "a generated cell needs a total count: give --library-size (the total count over its genes, after "
                "clipping to clip_counts), or real cells to take it from with --data-file"
            )
        rows = np.full(n_cells, -1)
        aux_tokens = np.tile(_unknown_aux(checkpoint), (n_cells, 1))
        target_genes = np.full(n_cells, settings.num_genes or max_genes)
        target_total = np.full(n_cells, float(settings.library_size))
        prompt_tokens = np.full((n_cells, 0), pad)
    else:
        if len(prompt_cells) == 0:
            raise UserError("the --data-file cells hold no cell with counts to prompt generation with")
        rows = np.arange(n_cells) % len(prompt_cells)
        batch = prompt_cells.batch(np.unique(rows))
        tokens, counts = batch.gene_tokens.numpy(), batch.gene_counts.numpy().astype(np.float64)
        where = np.searchsorted(np.unique(rows), rows)
        tokens, counts = tokens[where], counts[where]
        aux_tokens = batch.aux_tokens.numpy()[where]
        target_genes = (tokens != pad).sum(1)
        target_total = counts.sum(1)
        if settings.num_genes is not None:
            target_total = target_total * settings.num_genes / target_genes
            target_genes = np.full(n_cells, settings.num_genes)
        if settings.library_size is not None:
            target_total = np.full(n_cells, float(settings.library_size))
        prompt_tokens = tokens[:, : settings.prompt_genes]
        prompt_counts = counts[:, : settings.prompt_genes]
    num_genes = np.minimum(target_genes, max_genes)
    library_size = target_total * num_genes / target_genes
    if genes:
        prompt_tokens = np.tile(gene_tokens_of(checkpoint, genes), (n_cells, 1))
        prompt_counts = np.full(prompt_tokens.shape, np.nan)
    elif prompt_cells is None or not settings.prompt_genes:
        prompt_counts = np.full(prompt_tokens.shape, np.nan)
    if prompt_tokens.shape[1] > max_genes:
        raise UserError(f"the prompt has {prompt_tokens.shape[1]} genes, more than --max-genes {max_genes}")
    num_genes = np.maximum(num_genes, (prompt_tokens != pad).sum(1))
    for column, value in (aux or {}).items():
        aux_tokens[:, _aux_column(checkpoint, column)] = _aux_token(checkpoint, column, value)
    return Plan(rows, aux_tokens, num_genes.astype(np.int64), library_size, prompt_tokens, prompt_counts)


def _unknown_aux(checkpoint: Checkpoint) -> np.ndarray:
    return np.array(checkpoint.model.aux_unknown, dtype=np.int64)


def _aux_column(checkpoint: Checkpoint, column: str) -> int:
    columns = list(checkpoint.aux_vocabs)
    if column not in columns:
        raise UserError(f"--aux {column}=...: the checkpoint has no aux column {column!r}; its columns: {columns}")
    return columns.index(column)


def _aux_token(checkpoint: Checkpoint, column: str, value: str) -> int:
    vocab = checkpoint.aux_vocabs[column]
    if value not in vocab:
        raise UserError(f"--aux {column}={value!r} is not in the checkpoint's {column} vocabulary: {sorted(vocab)}")
    return vocab[value]


def gene_tokens_of(checkpoint: Checkpoint, names: Sequence[str]) -> np.ndarray:
    """Vocabulary indices of the genes of ``--genes``, named by gene id or symbol (:class:`GeneNames`).

    Raises
    ------
    KeyError
        For a gene the vocabulary lacks (with close matches).
    UserError
        For a gene named twice.
    """
    resolver = GeneNames(checkpoint.gene_vocab)
    gene_ids = [resolver.resolve(name, "--genes", name) for name in names]
    repeated = sorted({name for name, gene in zip(names, gene_ids, strict=True) if gene_ids.count(gene) > 1})
    if repeated:
        raise UserError(f"--genes names {repeated} more than once: a cell expresses each gene once")
    return checkpoint.gene_vocab.lookup(gene_ids)


def generate(
    checkpoint: Checkpoint,
    settings: GenerateSettings,
    device: torch.device,
    prompt_cells: TokenizedCells | None = None,
    aux: Mapping[str, str] | None = None,
    genes: Sequence[str] = (),
) -> ad.AnnData:
    """Sample cells from ``checkpoint`` (see the module docstring for the targets and the output).

    Parameters
    ----------
    checkpoint
        A loaded checkpoint whose model has a gene-id head.
    settings
        Numbers of cells and genes, sampling and targets.
    device
        Where the model runs.
    prompt_cells
        Real cells: conditions, targets and (with ``prompt_genes``) first genes of the generated cells.
    aux
        Aux column -> value, for every cell.
    genes
        A gene list every cell starts with (ids or symbols); their counts are drawn.
    """
    plan = plan_cells(checkpoint, settings, prompt_cells, aux, genes)
    model = checkpoint.model.eval()
    vocab = checkpoint.gene_vocab
    n_special = len(vocab.special_tokens)
    excluded = torch.zeros(len(vocab), dtype=torch.bool)
    excluded[:n_special] = True
    excluded[model.special_tokens.end] = False
    sampler = Sampler(settings.temperature, settings.top_k, settings.top_p)
    max_count = checkpoint.config.data_config.clip_counts
    n_cells = len(plan.num_genes)
    rows, columns, values, order, ended = [], [], [], [], np.zeros(n_cells, dtype=bool)
    with progress_bar(total=n_cells, unit="cell", desc="generate", disable=None, delay=1) as bar:
        for start in range(0, n_cells, settings.batch_size):
            cells = np.arange(start, min(n_cells, start + settings.batch_size))
            prompt = Prompt(
                torch.from_numpy(plan.prompt_tokens[cells]).to(device),
                torch.from_numpy(plan.prompt_counts[cells]).to(device),
            )
            result = generate_cells(
                model,
                torch.from_numpy(plan.aux_tokens[cells]).to(device) if model.aux_embeddings else None,
                torch.from_numpy(plan.num_genes[cells]).to(device),
                torch.from_numpy(plan.library_size[cells]).to(device),
                [np.random.default_rng([settings.seed, int(cell)]) for cell in cells],
                excluded,
                sampler=sampler,
                max_count=max_count,
                prompt=prompt,
                use_cache=settings.use_cache,
            )
            tokens, counts = result.tokens.cpu().numpy(), result.counts.cpu().numpy()
            cell, position = np.nonzero(tokens != model.special_tokens.pad)
            rows.append(cells[cell])
            columns.append(tokens[cell, position] - n_special)
            values.append(counts[cell, position])
            order.append(position + 1)
            ended[cells] = result.ended.cpu().numpy()
            bar.update(len(cells))
    shape = (n_cells, len(vocab) - n_special)
    rows, columns = np.concatenate(rows), np.concatenate(columns)
    x = sp.csr_matrix((np.concatenate(values).astype(np.float32), (rows, columns)), shape=shape)
    generation_order = sp.csr_matrix((np.concatenate(order).astype(np.int32), (rows, columns)), shape=shape)
    return ad.AnnData(
        X=x,
        obs=_generated_obs(checkpoint, settings, plan, prompt_cells, x, ended),
        var=_vocabulary_var(checkpoint),
        layers={GENERATION_ORDER: generation_order},
        uns={"transcriptformer": _metadata(checkpoint, settings, aux, genes)},
    )


def _generated_obs(
    checkpoint: Checkpoint,
    settings: GenerateSettings,
    plan: Plan,
    prompt_cells: TokenizedCells | None,
    x: sp.csr_matrix,
    ended: np.ndarray,
) -> pd.DataFrame:
    n_cells = x.shape[0]
    names = prompt_cells.obs_names if prompt_cells is not None else pd.Index([])
    obs = pd.DataFrame(index=pd.Index([f"generated_{i}" for i in range(n_cells)]))
    obs["prompt_cell"] = [names[row] if row >= 0 else "" for row in plan.prompt_rows]
    for i, (column, vocab) in enumerate(checkpoint.aux_vocabs.items()):
        value_of = {token: value for value, token in vocab.items()}
        obs[column] = pd.Categorical([value_of[token] for token in plan.aux_tokens[:, i]])
    obs["seed"] = settings.seed
    obs["target_num_genes"] = plan.num_genes
    obs["target_library_size"] = plan.library_size
    obs["num_genes"] = np.diff(x.indptr)
    obs["total_counts"] = np.asarray(x.sum(1)).ravel()
    obs["ended"] = ended
    return obs


def _vocabulary_var(checkpoint: Checkpoint) -> pd.DataFrame:
    gene_ids = checkpoint.gene_vocab.gene_ids
    var = pd.DataFrame(index=pd.Index(gene_ids, name="gene_id"))
    var[checkpoint.config.data_config.gene_col_name] = gene_ids
    return var


def _metadata(
    checkpoint: Checkpoint, settings: GenerateSettings, aux: Mapping[str, str] | None, genes: Sequence[str]
) -> dict:
    recorded = {k: v for k, v in dataclasses.asdict(settings).items() if v is not None}
    return {
        "checkpoint": str(checkpoint.path),
        "version": __version__,
        "settings": recorded | {"aux": dict(aux or {}), "genes": list(genes)},
        "count_rule": "mu_i = (T / N) * exp(l_i) / mean_{j<=i} exp(l_j), zero-truncated Poisson, clipped",
    }
