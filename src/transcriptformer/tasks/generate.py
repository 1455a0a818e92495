"""``generate``: sample new cells from a checkpoint, gene by gene with their counts (docs/generate.md).

The output's rows are the generated cells, not input cells: the task plans its own rows
(:meth:`GenerateTask.planned_rows`), ``num_cells`` of them, or one per prompt cell. Each generated cell has
targets and conditions:

* its aux values (the assay): those of its prompt cell, or ``aux`` (column -> value), else unknown (masked);
* its number of genes ``N`` and total count ``T`` (on the model's input scale, after clipping), which the count
  rule of :mod:`transcriptformer.model.generate` needs: those of its prompt cell, or ``num_genes`` (default
  ``max_genes``) and ``library_size``. ``max_genes`` caps ``N``; ``T`` is then scaled by the same factor;
* optionally the genes it starts with: the first ``prompt_genes`` genes and counts of its prompt cell, or a gene
  list (``genes``) whose counts are drawn.

Generated cell ``i`` uses prompt cell ``i mod n`` of the ``n`` prompt cells (the input's cells with counts), and
draws its random numbers from ``numpy.random.default_rng([seed, i])``: the same cell for the same seed, whatever
the batch size, the work units, the number of processes or an interrupted and resumed run.

The output holds raw integer counts over the vocabulary's genes in ``X`` (``var`` indexed by gene id, with the
checkpoint's gene column, so that it can be fed back to ``inference`` or ``score``; also ``layers["counts"]``),
``layers["generation_order"]`` (1 for the first gene generated, 2 for the second, ...), and per cell in ``obs``:
the prompt cell, the aux values, the seed, the targets, the number of genes and total count generated, and whether
the model emitted ``[END]``. ``uns["generation"]`` holds the count rule and a summary.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from transcriptformer.config import SamplingConfig
from transcriptformer.engine.task import BatchLoopTask, Part

if TYPE_CHECKING:
    import anndata as ad

    from transcriptformer.checkpoint import Checkpoint
    from transcriptformer.data.tokenize import TokenizedCells
    from transcriptformer.engine.config import RunConfig
    from transcriptformer.engine.run import MemoryResult
    from transcriptformer.engine.session import Session, WorkUnit
    from transcriptformer.pipeline import MemoryLimit

COUNTS = "counts"  # the per-gene layer of generated counts, also X
GENERATION_ORDER = "generation_order"
GENERATION_KEY = "generation"  # uns entry: the count rule and a summary
COUNT_RULE = "mu_i = (T / N) * exp(l_i) / mean_{j<=i} exp(l_j), zero-truncated Poisson, clipped"


@dataclass(frozen=True)
class GenerateConfig(SamplingConfig):
    """The settings of the generate task: those of :class:`~transcriptformer.config.SamplingConfig`, and these.

    Attributes
    ----------
    aux : dict of str to str
        Aux column -> value for every cell (e.g. ``{"assay": "MERFISH"}``), instead of the prompt cells'.
    genes : tuple of str
        Genes (ids or symbols) every cell starts with, in this order; their counts are drawn. A string is one gene.
    """

    aux: dict[str, str] = field(default_factory=dict)
    genes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "genes", (self.genes,) if isinstance(self.genes, str) else tuple(self.genes))
        object.__setattr__(self, "aux", dict(self.aux or {}))
        super().__post_init__()
        if self.prompt_genes and self.genes:
            raise ValueError("give either prompt_genes (genes of the prompt cells) or genes (a gene list), not both")


@dataclass
class Plan:
    """What each generated cell of a unit starts from.

    Attributes
    ----------
    aux_tokens : ndarray
        ``(n, A)`` conditions.
    num_genes : ndarray
        ``(n,)`` target number of genes ``N`` (at most ``max_genes``).
    library_size : ndarray
        ``(n,)`` target total count ``T`` over those genes.
    prompt_tokens, prompt_counts : ndarray
        ``(n, P)`` forced genes (``[PAD]`` past a cell's prompt) and their counts (NaN: drawn).
    """

    aux_tokens: np.ndarray
    num_genes: np.ndarray
    library_size: np.ndarray
    prompt_tokens: np.ndarray
    prompt_counts: np.ndarray


@dataclass
class GenerateTask(BatchLoopTask):
    """Generated cells as the output's rows, in units of ``chunk_size`` cells."""

    name: str = "generate"
    settings: GenerateConfig = field(default_factory=GenerateConfig)
    rows_are_cells: bool = False

    def check(self, config: RunConfig) -> None:
        """Raise a ``ValueError`` naming the setting when the checkpoint or the run cannot generate these cells."""
        seq_len = config.model.model_config.seq_len
        if config.model.model_type != "transcriptformer" or config.model.loss_config.gene_id_loss_weight <= 0:
            raise ValueError(
                "generating cells needs the checkpoint's model with a gene-id head (model_type, checkpoint)"
            )
        if self.settings.max_genes is not None and self.settings.max_genes > seq_len:
            raise ValueError(
                f"max_genes {self.settings.max_genes} is more than the model's seq_len {seq_len}; lower it"
            )
        if not config.model.data_config.drop_empty_cells:
            raise ValueError("prompt cells without counts cannot prompt generation: set drop_empty_cells")

    def output_keys(self, config: RunConfig) -> tuple[str, ...]:
        """None: the sampling loop calls the model itself."""
        return ()

    def added_obs_columns(self) -> tuple[str, ...]:
        """None: the obs of the output is the generated cells'."""
        return ()

    def planned_rows(self, input_cells: int | None) -> int:
        """``num_cells``, or one per prompt cell.

        Raises
        ------
        ValueError
            When the settings need prompt cells and there are none.
        """
        settings = self.settings
        if input_cells is None:
            if settings.prompt_genes:
                raise ValueError("prompt_genes takes the first genes of prompt cells: give them (data_files)")
            if settings.num_cells is None:
                raise ValueError("say how many cells to generate: num_cells, or prompt cells (data_files)")
            if settings.library_size is None:
                raise ValueError(
                    "a generated cell needs a total count: give library_size (the total count over its genes, after "
                    "clipping to clip_counts), or prompt cells to take it from (data_files)"
                )
            return settings.num_cells
        if input_cells == 0:
            raise ValueError("the input holds no cell with counts to prompt generation with")
        return settings.num_cells or input_cells

    def run_unit(
        self,
        session: Session,
        unit: WorkUnit,
        cells: TokenizedCells | None,
        on_batch: Callable[[int], object],
        limit: MemoryLimit,
    ) -> Part:
        """Generate the unit's cells, each from its prompt cell (read from the input) and its own random numbers."""
        from transcriptformer.pipeline import GeneOutputs

        checkpoint, prompts = session.checkpoint, session.files[0] if session.files else None
        rows = np.arange(unit.start, unit.stop)
        pieces = []
        n_prompts = len(prompts.cells) if prompts else 0
        # runs of rows whose prompt cells are consecutive: rows i with i mod n running up without wrapping
        for run in np.split(rows, np.flatnonzero(rows % n_prompts == 0)) if prompts else [rows]:
            if run.size:
                first = int(run[0] % n_prompts) if prompts else 0
                prompt_cells = prompts.cells.cells(first, first + run.size) if prompts else None
                plan = plan_cells(checkpoint, self.settings, run.size, prompt_cells)
                names = prompt_cells.obs_names if prompt_cells is not None else None
                pieces.append(generate_rows(checkpoint, self.settings, plan, run, session.device, names, on_batch))
        counts, order, obs = (
            sp_vstack([p[0] for p in pieces]),
            sp_vstack([p[1] for p in pieces]),
            pd.concat([p[2] for p in pieces]),
        )
        return Part(GeneOutputs(len(rows), gene_values={COUNTS: counts, GENERATION_ORDER: order}), obs)

    def output_var(self, session: Session) -> pd.DataFrame:
        """The vocabulary's genes (index the gene ids): the checkpoint's gene column, symbols, the inputs' columns."""
        from transcriptformer.engine.output import concat_var

        var = vocabulary_var(session.checkpoint)
        if not session.files:
            return var
        inputs = concat_var([f.var for f in session.files], var.index)  # missing for genes no input has
        return var.join(inputs.drop(columns=[c for c in inputs.columns if c in var.columns]))

    def main_layer(self, layers: Collection[str]) -> str:
        """The generated counts."""
        return COUNTS

    def finish(self, obs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
        """The prompt cells and aux values as categories; the count rule and a summary as ``uns["generation"]``."""
        strings = [c for c in obs.columns if obs[c].dtype == object]
        obs = obs.assign(**{c: pd.Categorical(obs[c]) for c in strings})
        summary = {
            "count_rule": COUNT_RULE,
            "cells": len(obs),
            "median_genes": float(obs["num_genes"].median()),
            "median_counts": float(obs["total_counts"].median()),
            "ended": int(obs["ended"].sum()),
        }
        return obs, {GENERATION_KEY: summary}

    def describe(self, uns: dict) -> list[str]:
        """One line about the cells generated."""
        s = uns[GENERATION_KEY]
        return [
            f"Generated {s['cells']} cells: median {s['median_genes']:g} genes and {s['median_counts']:g} counts per "
            f"cell; {s['ended']} ended with [END]"
        ]

    def write_into(self, adata: ad.AnnData, result: MemoryResult) -> None:
        """Generated cells are new rows, not the user's cells: see :meth:`to_anndata`."""
        raise TypeError("generated cells are not the rows of an AnnData; build one with GenerateTask.to_anndata")

    def to_anndata(self, result: MemoryResult, checkpoint: Checkpoint) -> ad.AnnData:
        """The AnnData of an in-memory run's generated cells, laid out as the output file."""
        import json

        import anndata as ad

        from transcriptformer.engine.task import task_description
        from transcriptformer.version import __version__

        counts = result.outputs.gene_values[COUNTS]
        metadata = {"checkpoint_path": str(checkpoint.path), "package_version": __version__}
        return ad.AnnData(
            X=counts,
            obs=result.obs,
            var=vocabulary_var(checkpoint),
            layers={COUNTS: counts, GENERATION_ORDER: result.outputs.gene_values[GENERATION_ORDER]},
            uns={"transcriptformer": metadata | {"task": json.dumps(task_description(self))}, **result.uns},
        )


def sp_vstack(matrices: Sequence):
    """Rows of sparse matrices stacked, as CSR."""
    import scipy.sparse as sp

    return sp.vstack(matrices, format="csr")


def plan_cells(
    checkpoint: Checkpoint, settings: GenerateConfig, n_cells: int, prompt_cells: TokenizedCells | None = None
) -> Plan:
    """The targets, conditions and prompts of ``n_cells`` cells, cell ``i`` from prompt cell ``i`` when given.

    Raises
    ------
    UserError
        When a gene or an aux value is unknown.
    """
    seq_len, pad = checkpoint.model.seq_len, checkpoint.model.special_tokens.pad
    max_genes = settings.max_genes or seq_len
    if prompt_cells is None:
        aux_tokens = np.tile(np.array(checkpoint.model.aux_unknown, dtype=np.int64), (n_cells, 1))
        target_genes = np.full(n_cells, settings.num_genes or max_genes)
        target_total = np.full(n_cells, float(settings.library_size))
        prompt_tokens = np.full((n_cells, 0), pad)
        prompt_counts = np.full((n_cells, 0), np.nan)
    else:
        batch = prompt_cells.batch(np.arange(n_cells))
        tokens, counts = batch.gene_tokens.numpy(), batch.gene_counts.numpy().astype(np.float64)
        aux_tokens = batch.aux_tokens.numpy()
        target_genes = (tokens != pad).sum(1)
        target_total = counts.sum(1)
        if settings.num_genes is not None:
            target_total = target_total * settings.num_genes / target_genes
            target_genes = np.full(n_cells, settings.num_genes)
        if settings.library_size is not None:
            target_total = np.full(n_cells, float(settings.library_size))
        prompt_tokens = tokens[:, : settings.prompt_genes]
        prompt_counts = counts[:, : settings.prompt_genes]
        if not settings.prompt_genes:
            prompt_counts = np.full(prompt_tokens.shape, np.nan)
    num_genes = np.minimum(target_genes, max_genes)
    library_size = target_total * num_genes / target_genes
    if settings.genes:
        prompt_tokens = np.tile(gene_tokens_of(checkpoint, settings.genes), (n_cells, 1))
        prompt_counts = np.full(prompt_tokens.shape, np.nan)
    if prompt_tokens.shape[1] > max_genes:
        from transcriptformer.errors import UserError

        raise UserError(f"the prompt has {prompt_tokens.shape[1]} genes, more than max_genes {max_genes}")
    num_genes = np.maximum(num_genes, (prompt_tokens != pad).sum(1))
    for column, value in settings.aux.items():
        aux_tokens[:, _aux_column(checkpoint, column)] = _aux_token(checkpoint, column, value)
    return Plan(aux_tokens, num_genes.astype(np.int64), library_size, prompt_tokens, prompt_counts)


def _aux_column(checkpoint: Checkpoint, column: str) -> int:
    from transcriptformer.errors import UserError

    columns = list(checkpoint.aux_vocabs)
    if column not in columns:
        raise UserError(f"aux {column}=...: the checkpoint has no aux column {column!r}; its columns: {columns}")
    return columns.index(column)


def _aux_token(checkpoint: Checkpoint, column: str, value: str) -> int:
    from transcriptformer.errors import UserError

    vocab = checkpoint.aux_vocabs[column]
    if value not in vocab:
        raise UserError(f"aux {column}={value!r} is not in the checkpoint's {column} vocabulary: {sorted(vocab)}")
    return vocab[value]


def gene_tokens_of(checkpoint: Checkpoint, names: Sequence[str]) -> np.ndarray:
    """Vocabulary indices of the genes of ``genes``, named by gene id or symbol (:class:`GeneNames`).

    Raises
    ------
    KeyError
        For a gene the vocabulary lacks (with close matches).
    UserError
        For a gene named twice.
    """
    from transcriptformer.data.gene_symbols import GeneNames
    from transcriptformer.errors import UserError

    resolver = GeneNames(checkpoint.gene_vocab)
    gene_ids = [resolver.resolve(name, "genes", name) for name in names]
    repeated = sorted({name for name, gene in zip(names, gene_ids, strict=True) if gene_ids.count(gene) > 1})
    if repeated:
        raise UserError(f"genes names {repeated} more than once: a cell expresses each gene once")
    return checkpoint.gene_vocab.lookup(gene_ids)


def generate_rows(
    checkpoint: Checkpoint,
    settings: GenerateConfig,
    plan: Plan,
    rows: np.ndarray,
    device,
    prompt_names: pd.Index | None,
    on_batch: Callable[[int], object],
):
    """Sample the cells ``rows`` (their indices among all generated cells) of ``plan``, ``batch_size`` at a time.

    Returns
    -------
    counts, generation_order, obs
        ``(n, n_genes)`` CSR matrices over the vocabulary's genes, and the cells' obs.
    """
    import scipy.sparse as sp
    import torch

    from transcriptformer.model.generate import Prompt, Sampler, generate_cells

    model = checkpoint.model.eval()
    vocab = checkpoint.gene_vocab
    n_special = len(vocab.special_tokens)
    excluded = torch.zeros(len(vocab), dtype=torch.bool)
    excluded[:n_special] = True
    excluded[model.special_tokens.end] = False
    sampler = Sampler(settings.temperature, settings.top_k, settings.top_p)
    n_cells = len(rows)
    entries, ended = [], np.zeros(n_cells, dtype=bool)
    for start in range(0, n_cells, settings.batch_size):
        cells = np.arange(start, min(n_cells, start + settings.batch_size))
        result = generate_cells(
            model,
            torch.from_numpy(plan.aux_tokens[cells]).to(device) if model.aux_embeddings else None,
            torch.from_numpy(plan.num_genes[cells]).to(device),
            torch.from_numpy(plan.library_size[cells]).to(device),
            [np.random.default_rng([settings.seed, int(rows[cell])]) for cell in cells],
            excluded,
            sampler=sampler,
            max_count=checkpoint.config.data_config.clip_counts,
            prompt=Prompt(
                torch.from_numpy(plan.prompt_tokens[cells]).to(device),
                torch.from_numpy(plan.prompt_counts[cells]).to(device),
            ),
            use_cache=settings.use_cache,
        )
        tokens, counts = result.tokens.cpu().numpy(), result.counts.cpu().numpy()
        cell, position = np.nonzero(tokens != model.special_tokens.pad)
        entries.append((cells[cell], tokens[cell, position] - n_special, counts[cell, position], position + 1))
        ended[cells] = result.ended.cpu().numpy()
        on_batch(len(cells))
    row, column, value, order = (np.concatenate(parts) for parts in zip(*entries, strict=True))
    shape = (n_cells, len(vocab) - n_special)
    x = sp.csr_matrix((value.astype(np.float32), (row, column)), shape=shape)
    generation_order = sp.csr_matrix((order.astype(np.int32), (row, column)), shape=shape)
    obs = pd.DataFrame(index=pd.Index([f"generated_{i}" for i in rows]))
    obs["prompt_cell"] = np.asarray(prompt_names if prompt_names is not None else [""] * n_cells, dtype=object)
    for i, (column, aux_vocab) in enumerate(checkpoint.aux_vocabs.items()):
        value_of = {token: name for name, token in aux_vocab.items()}
        obs[column] = np.array([value_of[token] for token in plan.aux_tokens[:, i]], dtype=object)
    obs["seed"] = settings.seed
    obs["target_num_genes"] = plan.num_genes
    obs["target_library_size"] = plan.library_size
    obs["num_genes"] = np.diff(x.indptr)
    obs["total_counts"] = np.asarray(x.sum(1)).ravel()
    obs["ended"] = ended
    return x, generation_order, obs


def vocabulary_var(checkpoint: Checkpoint) -> pd.DataFrame:
    """The vocabulary's genes, index ``gene_id``, with the checkpoint's gene column and their symbols."""
    from transcriptformer.engine.output import with_symbols

    gene_ids = checkpoint.gene_vocab.gene_ids
    var = pd.DataFrame(index=pd.Index(gene_ids, name="gene_id"))
    var[checkpoint.config.data_config.gene_col_name] = gene_ids
    return with_symbols(var)
