"""``screen``: every expressed gene of each cell knocked out (or over-expressed), ranked with statistics.

Each work unit's cells (those of ``obs_filter``, and of the start state when a goal state is given) are screened by
:func:`~transcriptformer.perturbation.screen.screen_cells`: a row per changed (cell, gene) pair, with its effects in
obs, and no per-gene arrays. Once every unit is done, :meth:`ScreenTask.summarize` ranks the genes against a null of
other genes with a similar count in the same cells (:func:`~transcriptformer.perturbation.screen.gene_statistics`),
and :meth:`ScreenTask.write_files` writes the ranked genes and the pairs as tables beside ``screen.h5ad``.
Resume, several processes and the output lock are the engine's, as for every task.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from transcriptformer.engine.config import InferenceConfig, RunConfig
from transcriptformer.engine.task import BatchLoopTask, Part
from transcriptformer.errors import first_few
from transcriptformer.model.outputs import SCREEN_KEYS

if TYPE_CHECKING:
    from transcriptformer.data.tokenize import TokenizedCells
    from transcriptformer.engine.session import Session, WorkUnit
    from transcriptformer.perturbation.screen import GoalStates
    from transcriptformer.pipeline import GeneOutputs, MemoryLimit

KINDS = ("knock_out", "over_express")
# uns keys and the files beside the output.
SETTINGS_KEY, GENES_KEY = "screen", "screen_genes"
GENES_FILES, PAIRS_FILE = ("screen_genes.csv", "screen_genes.parquet"), "screen_pairs.parquet"


def parse_state(text: str | None, name: str) -> tuple[str, str] | None:
    """``KEY=VALUE`` as ``(KEY, VALUE)``; ``None`` for ``None``."""
    if text is None:
        return None
    key, has_value, value = text.partition("=")
    if not (has_value and key.strip() and value.strip()):
        raise ValueError(
            f"{name} {text!r}: write an obs column and one of its values as KEY=VALUE (cell_type=astrocyte)"
        )
    return key.strip(), value.strip()


@dataclass
class ScreenConfig:
    """What a screen perturbs and how its genes are ranked.

    Attributes
    ----------
    kind : str
        ``knock_out`` (each expressed gene's count set to 0) or ``over_express`` (set to the cell's highest count).
    genes_file : str or None
        A text file of genes to screen, one a line (Ensembl ids of the vocabulary or symbols); ``None``: every
        expressed gene. Unknown names are listed in a warning; none known is an error.
    max_genes_per_cell : int
        The most expressed genes screened per cell; 0: all.
    start_state, goal_state : str or None
        ``KEY=VALUE`` obs values: the start state's cells are screened, and each pair's ``goal_shift`` measures its
        move toward the goal state's centroid. Both or neither.
    prefix_reuse : bool
        Reuse each cell's key/value prefix (equal to the straightforward path within float32 rounding, faster).
    null_bins : int
        Quantile bins of the genes' counts for the null (genes of similar count in the same cells).
    output_path, output_filename : str
        Where a screen writes (its other run settings default as an inference run's).
    """

    kind: str = "knock_out"
    genes_file: str | None = None
    max_genes_per_cell: int = 0
    start_state: str | None = None
    goal_state: str | None = None
    prefix_reuse: bool = True
    null_bins: int = 10
    output_path: str = "./screen_results"
    output_filename: str = "screen.h5ad"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.max_genes_per_cell < 0:
            raise ValueError(f"max_genes_per_cell must be >= 0 (0: all), got {self.max_genes_per_cell}")
        if self.null_bins < 1:
            raise ValueError(f"null_bins must be >= 1, got {self.null_bins}")
        if (self.start_state is None) != (self.goal_state is None):
            raise ValueError("start_state and goal_state go together: give both, or neither")
        parse_state(self.start_state, "start_state")
        parse_state(self.goal_state, "goal_state")

    def inference_defaults(self) -> InferenceConfig:
        """The settings of a screen run before flags change them."""
        return InferenceConfig(
            output_path=self.output_path, output_filename=self.output_filename, output_keys=list(SCREEN_KEYS)
        )


@dataclass
class ScreenTask(BatchLoopTask):
    """A row per changed (cell, gene) pair of the screened cells; the genes ranked in ``summarize``."""

    name: str = "screen"
    settings: ScreenConfig = field(default_factory=ScreenConfig)
    rows_are_cells: bool = False
    gene_ids: list[str] | None = field(default=None, repr=False)  # of genes_file, resolved by check
    goal: GoalStates | None = field(default=None, repr=False, compare=False)  # per process, on first use

    def check(self, config: RunConfig) -> None:
        """The outputs a screen compares, its states' cells and its genes file, before anything is loaded."""
        settings = self.settings
        if sorted(config.inference.output_keys) != sorted(SCREEN_KEYS):
            raise ValueError(f"a screen compares the outputs {', '.join(SCREEN_KEYS)}; leave output_keys unset")
        if settings.goal_state is not None:
            if config.inference.reads_soma:
                raise ValueError("start_state and goal_state select cells of files; give data_files")
            check_states(config, settings)
        if settings.genes_file is not None:
            self.gene_ids = read_genes_file(Path(settings.genes_file), config)

    def output_keys(self, config: RunConfig) -> tuple[str, ...]:
        """The per-cell outputs a screen compares."""
        return SCREEN_KEYS

    def run_unit(
        self,
        session: Session,
        unit: WorkUnit,
        cells: TokenizedCells,
        on_batch: Callable[[int], object],
        limit: MemoryLimit,
    ) -> Part:
        """The unit's screened cells, their pairs and effects (a progress bar of pairs within the unit)."""
        from transcriptformer.console import progress_bar
        from transcriptformer.perturbation.screen import ScreenRun, screen_cells, take
        from transcriptformer.pipeline import GeneOutputs

        settings = self.settings
        predict = session.config.inference.predict_config
        run = ScreenRun(session.model, predict, session.device, settings.prefix_reuse, session.gene_columns)
        run.limit = limit
        if settings.goal_state is not None:
            self.goal = self.goal or goal_states(session, run, settings)
            run.goal = self.goal
            cells = take(cells, np.flatnonzero(in_state(session, unit, settings.start_state)))
        genes = None if self.gene_ids is None else np.flatnonzero(np.isin(cells.gene_ids, self.gene_ids))
        cap = settings.max_genes_per_cell
        expressed = np.diff(cells.counts.indptr)  # pairs of a whole screen, before unchanged ones are left out
        expected = int(np.minimum(expressed, cap or cells.counts.shape[1]).sum()) if genes is None else None
        with progress_bar(total=expected, unit="pair", desc="pairs", leave=False, disable=None, delay=1) as bar:
            pairs = screen_cells(run, cells, settings.kind, genes, cap, on_pairs=bar.update)
        on_batch(unit.stop - unit.start)
        pairs.index = pd.Index(pairs["gene_id"] + "|" + pairs["cell"])
        return Part(GeneOutputs(n_cells=len(pairs)), pairs)

    def finish(self, obs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
        """The settings, the genes file's genes and the number of pairs into uns."""
        from dataclasses import asdict

        if obs.empty:
            raise ValueError(
                "the screen found no gene to perturb in the cells selected; check obs_filter and the states"
            )
        settings = {k: v for k, v in asdict(self.settings).items() if v is not None}
        return obs, {SETTINGS_KEY: settings | {"n_pairs": len(obs), "n_cells": int(obs["cell"].nunique())}}

    def summarize(self, obs: pd.DataFrame, outputs: Iterable[GeneOutputs], genes: pd.Index) -> dict:
        """The genes ranked against the null (:func:`~transcriptformer.perturbation.screen.gene_statistics`)."""
        from transcriptformer.perturbation.screen import gene_statistics
        from transcriptformer.perturbation.summary import gene_symbols

        effect = "goal_shift" if self.settings.goal_state is not None else "cosine_shift"
        table = gene_statistics(obs, effect, self.settings.null_bins)
        table.insert(1, "symbol", gene_symbols(table.index))
        return {GENES_KEY: table.reset_index()}

    def output_files(self, config: RunConfig) -> tuple[str, ...]:
        """The ranked genes (CSV, Parquet) and every pair (Parquet)."""
        return (*GENES_FILES, PAIRS_FILE)

    def write_files(self, folder: Path, obs: pd.DataFrame, uns: dict) -> None:
        """The tables of :meth:`output_files`, through pyarrow."""
        table = uns[GENES_KEY]
        table.to_csv(folder / GENES_FILES[0], index=False)
        table.to_parquet(folder / GENES_FILES[1], index=False)
        obs.to_parquet(folder / PAIRS_FILE)

    def describe(self, uns: dict) -> list[str]:
        """The pairs screened and the ten first genes."""
        table, settings = uns[GENES_KEY], uns[SETTINGS_KEY]
        columns = ["rank", "symbol", "n_cells", "mean_cosine_shift", "mean_residual", "p_value", "fdr"]
        columns[4:4] = ["mean_goal_shift"] * ("mean_goal_shift" in table)
        return [
            f"{settings['n_pairs']} (cell, gene) pairs of {settings['n_cells']} cells; "
            f"{int((table['fdr'] < 0.05).sum())} of {len(table)} genes at FDR < 0.05",
            table[["gene_id", *columns]].head(10).to_string(index=False, float_format=lambda v: f"{v:.3g}"),
        ]


def read_genes_file(path: Path, config: RunConfig) -> list[str]:
    """The gene ids of a genes file, resolved in the checkpoint's vocabulary; unknown names are warned about."""
    from transcriptformer.checkpoint import read_vocabularies
    from transcriptformer.data.gene_symbols import GeneNames
    from transcriptformer.data.sources import read_var

    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise ValueError(f"genes_file {path}: cannot read it ({error.strerror or error})") from None
    vocab, _ = read_vocabularies(Path(config.model.checkpoint_path), config.checkpoint_config)
    input_var = read_var(config.inference.data_files) if config.inference.data_files else None
    resolver, known, unknown = GeneNames(vocab, input_var), [], []
    for name in names:
        try:
            known.append(resolver.resolve(name, "genes_file", name))
        except KeyError:
            unknown.append(name)
    if not known:
        raise ValueError(f"genes_file {path}: none of its {len(names)} genes is in the checkpoint's vocabulary")
    if unknown:
        groups = {"in the input file but not in the vocabulary": [], "not in the vocabulary": []}
        for name in unknown:
            groups[next(iter(groups)) if resolver.in_input(name) else "not in the vocabulary"].append(name)
        parts = [f"{len(group)} {where} ({first_few(group)})" for where, group in groups.items() if group]
        warnings.warn(
            f"genes_file {path}: {len(unknown)} unknown gene(s) skipped: {'; '.join(parts)} "
            "(`transcriptformer genes` lists the vocabulary)",
            stacklevel=2,
        )
    return list(dict.fromkeys(known))


def state_rows(obs: pd.DataFrame, state: str, name: str) -> np.ndarray:
    """``(len(obs),)`` bool: the cells of ``obs`` in the state ``KEY=VALUE``."""
    key, value = parse_state(state, name)
    if key not in obs.columns:
        raise ValueError(f"{name} {state!r}: obs has no column {key!r} (columns: {list(obs.columns)})")
    return (obs[key].astype(str) == value).to_numpy()


def check_states(config: RunConfig, settings: ScreenConfig) -> None:
    """Both states hold cells of the input files (before the cell filters)."""
    from transcriptformer.data.sources import open_counts

    counts = {"start_state": 0, "goal_state": 0}
    for path in config.inference.data_files:
        with open_counts(Path(path), config.inference.use_raw) as reader:
            for name in counts:
                counts[name] += int(state_rows(reader.obs, getattr(settings, name), name).sum())
    for name, n in counts.items():
        if n == 0:
            raise ValueError(
                f"{name} {getattr(settings, name)!r} holds no cell of the input files; choose another value"
            )


def in_state(session: Session, unit: WorkUnit, state: str, name: str = "start_state") -> np.ndarray:
    """Whether each cell of ``unit`` is in ``state``."""
    cells = session.files[unit.file_index].cells
    return state_rows(cells.reader.obs.iloc[cells.source_rows(unit.start, unit.stop)], state, name)


def goal_states(session: Session, run, settings: ScreenConfig) -> GoalStates:
    """The start and goal states' centroids over every unit's cells (each process computes the same)."""
    from transcriptformer.perturbation.screen import GoalStates, take

    sums = {"start_state": 0.0, "goal_state": 0.0}
    counts = dict.fromkeys(sums, 0)
    for unit in session.units:
        rows = {name: np.flatnonzero(in_state(session, unit, getattr(settings, name), name)) for name in sums}
        if not any(r.size for r in rows.values()):
            continue
        cells = session.read_unit(unit)
        for name, selected in rows.items():
            if selected.size:
                embeddings = run.cell_outputs(take(cells, selected))["embeddings"].astype(np.float64)
                sums[name] = sums[name] + embeddings.sum(0)
                counts[name] += selected.size
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"{empty[0]} holds no cell that the cell filters keep; choose another value")
    return GoalStates(sums["start_state"] / counts["start_state"], sums["goal_state"] / counts["goal_state"])
