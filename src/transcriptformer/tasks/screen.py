"""``screen``: every expressed gene of each cell knocked out (or over-expressed), ranked with statistics.

Each work unit's cells (those of ``obs_filter``, and of the start state when a goal state is given) are screened by
:func:`~transcriptformer.perturbation.screen.screen_groups`: a row per changed (cell, gene) pair with its effects,
written at once to the unit's Parquet file beside the unit's saved part (:func:`pairs_file`), so that resume and
several processes keep them as they keep the units. The output's rows are the screened cells (``n_pairs``). Once
every unit is done, :meth:`ScreenTask.summarize` ranks the genes against a null of other genes with a similar count
in the same cells (:func:`~transcriptformer.perturbation.screen.gene_statistics`), and
:meth:`ScreenTask.write_files` writes the ranked genes and merges the units' pairs, a file at a time, beside
``screen.h5ad``: memory holds one unit's pairs, never all of them. Before any unit runs, the planned pairs are
checked against the output disk's free space; the progress bar counts pairs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from transcriptformer.config import MAX_GENES, check_range, check_types
from transcriptformer.engine.config import RunConfig, default_output_path
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
N_PAIRS_COLUMN = "n_pairs"  # obs of the output: a row per screened cell, its pairs
PAIRS_PREFIX = "pairs-"  # the units' pair files in the run's folder of saved units


def pairs_file(folder: Path, unit_index: int) -> Path:
    """The Parquet file of one unit's pairs in the run's folder of saved units."""
    return folder / f"{PAIRS_PREFIX}{unit_index:06d}.parquet"


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
    output_path: str = default_output_path("screen")
    output_filename: str = "screen.h5ad"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        check_types(self, "")
        check_range(self, "", "max_genes_per_cell", at_least=0, at_most=MAX_GENES, also="0: all")
        check_range(self, "", "null_bins", at_least=1, at_most=MAX_GENES)
        if (self.start_state is None) != (self.goal_state is None):
            raise ValueError("start_state and goal_state go together: give both, or neither")
        start, goal = parse_state(self.start_state, "start_state"), parse_state(self.goal_state, "goal_state")
        if start is not None and start == goal:
            raise ValueError(f"start_state and goal_state are both {self.start_state!r}: give a goal of other cells")

    def run_defaults(self) -> RunConfig:
        """The settings of a screen run before flags change them."""
        return RunConfig().replace(
            output_path=self.output_path, output_filename=self.output_filename, output_keys=SCREEN_KEYS
        )


@dataclass
class ScreenTask(BatchLoopTask):
    """A row per changed (cell, gene) pair of the screened cells; the genes ranked in ``summarize``."""

    name: str = "screen"
    settings: ScreenConfig = field(default_factory=ScreenConfig)
    rows_are_cells: bool = False
    gene_ids: list[str] | None = field(default=None, repr=False)  # of genes_file, resolved by check
    goal: GoalStates | None = field(default=None, repr=False, compare=False)  # per process, on first use
    pairs_folder: Path | None = field(default=None, repr=False, compare=False)  # process 0's, set by check_plan

    def check(self, config: RunConfig) -> None:
        """The outputs a screen compares, its states' cells and its genes file, before anything is loaded."""
        settings = self.settings
        if sorted(config.predict.output_keys) != sorted(SCREEN_KEYS):
            raise ValueError(f"a screen compares the outputs {', '.join(SCREEN_KEYS)}; leave output_keys unset")
        if settings.goal_state is not None:
            if config.input.reads_soma:
                raise ValueError("start_state and goal_state select cells of files; give data_files")
            check_states(config, settings)
        if settings.genes_file is not None:
            self.gene_ids = read_genes_file(Path(settings.genes_file), config)

    def output_keys(self, config: RunConfig) -> tuple[str, ...]:
        """The per-cell outputs a screen compares."""
        return SCREEN_KEYS

    def check_plan(self, session: Session) -> None:
        """The output's disk holds the files of every planned pair (:func:`~.perturbation.screen.check_disk_space`).

        Also where this process (process 0, which merges) finds the units' pairs: the run's folder of saved units.
        """
        from transcriptformer.engine.parts import parts_dir
        from transcriptformer.perturbation.screen import check_disk_space

        self.pairs_folder = parts_dir(session)
        check_disk_space(session.output_file.parent, self.progress(session, session.units)[0])

    def progress(self, session: Session, units: Sequence[WorkUnit]) -> tuple[int, str]:
        """The pairs planned in ``units`` (an upper bound: unchanged variants have no row)."""
        return sum(int(self.planned_pairs(session, unit).sum()) for unit in units), "pair"

    def planned_pairs(self, session: Session, unit: WorkUnit) -> np.ndarray:
        """The pairs planned per screened cell of ``unit`` (:func:`~.perturbation.screen.planned_pairs`)."""
        from transcriptformer.perturbation.screen import planned_pairs

        settings, cells = self.settings, session.files[unit.file_index].cells
        expressed = cells.n_expressed(unit.start, unit.stop)
        if settings.goal_state is not None:
            expressed = expressed[in_state(session, unit, settings.start_state)]
        n_genes = None if self.gene_ids is None else len(self.gene_ids)
        return planned_pairs(expressed, settings.kind, n_genes, settings.max_genes_per_cell, cells.seq_len)

    def run_unit(
        self,
        session: Session,
        unit: WorkUnit,
        cells: TokenizedCells,
        on_batch: Callable[[int], object],
        limit: MemoryLimit,
    ) -> Part:
        """The unit's pairs into its Parquet file (:func:`pairs_file`); the Part: a row per screened cell, its pairs.

        A row group per group of cells, written as each is done: memory holds one group's pairs.
        """
        from transcriptformer.engine.parts import parts_dir
        from transcriptformer.perturbation.screen import ScreenRun, pair_writer, screen_groups, take
        from transcriptformer.pipeline import GeneOutputs

        settings = self.settings
        predict = session.config.predict
        run = ScreenRun(session.model, predict, session.device, settings.prefix_reuse, session.gene_columns)
        run.limit = limit
        if settings.goal_state is not None:
            self.goal = self.goal or goal_states(session, run, settings)
            run.goal = self.goal
            cells = take(cells, np.flatnonzero(in_state(session, unit, settings.start_state)))
        genes = None if self.gene_ids is None else np.flatnonzero(np.isin(cells.gene_ids, self.gene_ids))
        screened = pd.Series(cells.obs_names.astype(str), dtype=object)
        n_pairs = pd.Series(0, index=pd.unique(screened), dtype=np.int64)
        with pair_writer(pairs_file(parts_dir(session), unit.index), settings.goal_state is not None) as write:
            for pairs in screen_groups(run, cells, settings.kind, genes, settings.max_genes_per_cell):
                write(pairs)
                n_pairs = n_pairs.add(pairs["cell"].value_counts(), fill_value=0).astype(np.int64)
                on_batch(len(pairs))
        n_pairs = screened.map(n_pairs).to_numpy(dtype=np.int64)
        obs = pd.DataFrame({N_PAIRS_COLUMN: n_pairs}, index=pd.Index(screened, name=None))
        unit_cells = session.files[unit.file_index].obs.index[unit.start : unit.stop].astype(str)
        position = pd.Series(np.arange(len(unit_cells)), unit_cells)  # a screened cell by its obs name
        cells_of_rows = position[~position.index.duplicated()][screened].to_numpy()
        return Part(GeneOutputs(n_cells=len(obs)), obs, cells=cells_of_rows)

    def finish(self, obs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
        """The settings, the genes file's genes and the numbers of pairs and cells into uns."""
        from dataclasses import asdict

        n_pairs = int(obs[N_PAIRS_COLUMN].sum()) if len(obs) else 0
        if n_pairs == 0:
            raise ValueError(
                "the screen found no gene to perturb in the cells selected; check obs_filter and the states"
            )
        settings = {k: v for k, v in asdict(self.settings).items() if v is not None}
        n_cells = int((obs[N_PAIRS_COLUMN] > 0).sum())
        return obs, {SETTINGS_KEY: settings | {"n_pairs": n_pairs, "n_cells": n_cells}}

    def summarize(self, obs: pd.DataFrame, outputs: Iterable[GeneOutputs], genes: pd.Index) -> dict:
        """The genes ranked against the null (:func:`~transcriptformer.perturbation.screen.gene_statistics`).

        Read from the units' pair files, one at a time; they must hold the pairs that the units counted.
        """
        from transcriptformer.perturbation.screen import gene_statistics
        from transcriptformer.perturbation.summary import gene_symbols

        files = self.pair_files(int(obs[N_PAIRS_COLUMN].sum()))
        effect = "goal_shift" if self.settings.goal_state is not None else "cosine_shift"
        table = gene_statistics(files, effect, self.settings.null_bins)
        table.insert(1, "symbol", gene_symbols(table.index))
        return {GENES_KEY: table.reset_index()}

    def pair_files(self, n_pairs: int) -> list[Path]:
        """The units' pair files, in unit order; a ``UserError`` when they do not hold ``n_pairs`` pairs."""
        import pyarrow.parquet as pq

        from transcriptformer.errors import UserError

        files = sorted(self.pairs_folder.glob(f"{PAIRS_PREFIX}*.parquet"))  # unit order: zero-padded numbers
        found = sum(pq.ParquetFile(file).metadata.num_rows for file in files)
        if found != n_pairs:
            raise UserError(
                f"the pair files in {self.pairs_folder} hold {found} pairs and the saved units {n_pairs}: a file is "
                "missing or foreign; run without `resume` to start over"
            )
        return files

    def output_files(self, config: RunConfig) -> tuple[str, ...]:
        """The ranked genes (CSV, Parquet) and every pair (Parquet)."""
        return (*GENES_FILES, PAIRS_FILE)

    def write_files(self, folder: Path, obs: pd.DataFrame, uns: dict) -> None:
        """The tables of :meth:`output_files`, through pyarrow; the pairs merged from the units' files."""
        from transcriptformer.perturbation.screen import merge_pair_files

        table = uns[GENES_KEY]
        table.to_csv(folder / GENES_FILES[0], index=False)
        table.to_parquet(folder / GENES_FILES[1], index=False)
        files = self.pair_files(int(obs[N_PAIRS_COLUMN].sum()))
        merge_pair_files(files, folder / PAIRS_FILE, self.settings.goal_state is not None)

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
    except UnicodeDecodeError:
        raise ValueError(f"genes_file {path} is not a UTF-8 text file; write one gene a line") from None
    vocab, _ = read_vocabularies(Path(config.model.checkpoint_path), config.checkpoint_config)
    input_var = read_var(config.input.data_files) if config.input.data_files else None
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
    for path in config.input.data_files:
        with open_counts(Path(path), config.input.use_raw) as reader:
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
