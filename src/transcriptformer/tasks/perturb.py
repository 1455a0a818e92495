"""``perturb``: in-silico knock-outs and over-expressions of genes in every cell, and what the model predicts.

Each work unit of cells is perturbed and run by :func:`~transcriptformer.perturbation.effects.perturb_cells`; its
rows are the (cell, perturbation) pairs of its cells, cell by cell, with their per-cell effects in
obs and per-gene effects as sparse layers. Once every unit is done, :meth:`PerturbTask.summarize` reduces them to
the per-perturbation table and the ranked gene table (:mod:`~transcriptformer.perturbation.summary`), which
:meth:`PerturbTask.write_files` writes beside ``perturbations.h5ad`` (:mod:`~transcriptformer.perturbation.output`).

From files: ``transcriptformer perturb`` (resume, several processes, the output lock, as every engine run); in
memory: :meth:`TranscriptFormerModel.perturb <transcriptformer.api.TranscriptFormerModel.perturb>`. The command line
reads :class:`PerturbConfig` before torch, so the heavy imports wait for a run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from transcriptformer.config import MAX_GENES, check_range, check_types
from transcriptformer.engine.config import RunConfig, default_output_path
from transcriptformer.engine.task import BatchLoopTask, Part
from transcriptformer.model.outputs import PERTURBATION_KEYS

if TYPE_CHECKING:
    from transcriptformer.data.tokenize import TokenizedCells
    from transcriptformer.engine.session import Session, WorkUnit
    from transcriptformer.perturbation.specs import Perturbation
    from transcriptformer.pipeline import GeneOutputs, MemoryLimit


@dataclass
class PerturbConfig:
    """What to perturb, and how the results are reduced.

    How cells run through the model (batch size, token budget, precision, cells per unit) is the run's
    :class:`~transcriptformer.engine.config.RunConfig`; results depend on none of them.

    Attributes
    ----------
    knock_out : tuple of str
        One perturbation each: a gene (Ensembl id of the checkpoint's vocabulary, or symbol) removed from every
        cell; ``GENE+GENE`` removes several at once.
    over_express : tuple of str
        One perturbation each: ``GENE=COUNT`` sets the gene's count in every cell, ``GENE`` alone sets it to the
        cell's highest count; ``GENE=COUNT+GENE`` sets several at once.
    top_genes : int
        Rows of the ranked table of affected genes kept per perturbation; 0: every gene.
    output_path, output_filename : str
        Where the perturb run writes (its other run settings default as an inference run's).
    """

    knock_out: tuple[str, ...] = ()
    over_express: tuple[str, ...] = ()
    top_genes: int = 50
    output_path: str = default_output_path("perturb")
    output_filename: str = "perturbations.h5ad"

    def __post_init__(self) -> None:
        for name in ("knock_out", "over_express"):  # one perturbation may be given as a string
            value = getattr(self, name)
            setattr(self, name, (value,) if isinstance(value, str) else tuple(value))
        check_types(self, "")
        check_range(self, "", "top_genes", at_least=0, at_most=MAX_GENES, also="0: every gene")

    def run_defaults(self) -> RunConfig:
        """The settings of a perturb run before flags change them."""
        return RunConfig().replace(
            output_path=self.output_path, output_filename=self.output_filename, output_keys=PERTURBATION_KEYS
        )


@dataclass
class PerturbTask(BatchLoopTask):
    """Every perturbation of ``settings`` applied to every cell; a row per (perturbation, cell).

    ``perturbations`` are parsed from ``settings`` once, by :meth:`check`, and travel with the task to every process.
    """

    name: str = "perturb"
    settings: PerturbConfig = field(default_factory=PerturbConfig)
    rows_are_cells: bool = False
    perturbations: list[Perturbation] = field(default_factory=list, repr=False)

    def check(self, config: RunConfig) -> None:
        """Parse the perturbations in the checkpoint's vocabulary; the run computes the outputs they compare."""
        settings = self.settings
        if not settings.knock_out and not settings.over_express:
            raise ValueError("nothing to perturb: give at least one knock_out GENE or over_express GENE[=COUNT]")
        if sorted(config.predict.output_keys) != sorted(PERTURBATION_KEYS):
            raise ValueError(
                f"perturb compares the outputs {', '.join(PERTURBATION_KEYS)}; leave output_keys and emb_type unset"
            )
        if config.model.pretrained_embedding:
            raise ValueError("perturb names genes of the checkpoint's own vocabulary; leave out pretrained_embedding")
        from transcriptformer.checkpoint import read_vocabularies
        from transcriptformer.data.sources import read_var
        from transcriptformer.perturbation.specs import parse_perturbations

        vocab, _ = read_vocabularies(Path(config.model.checkpoint_path), config.checkpoint_config)
        input_var = read_var(config.input.data_files) if config.input.data_files else None
        self.perturbations = parse_perturbations(settings.knock_out, settings.over_express, vocab, input_var)

    def run_unit(
        self,
        session: Session,
        unit: WorkUnit,
        cells: TokenizedCells,
        on_batch: Callable[[int], object],
        limit: MemoryLimit,
    ) -> Part:
        """The unit's cells perturbed and run with their unperturbed selves (progress: the unit's cells at its end)."""
        from transcriptformer.perturbation.effects import perturb_cells

        predict = session.config.predict
        obs, effects = perturb_cells(
            session.model,
            cells,
            self.perturbations,
            session.checkpoint.gene_vocab,
            predict,
            session.device,
            session.gene_columns,
            limit=limit,
        )
        on_batch(len(cells))
        return Part(effects, obs, cells=np.repeat(np.arange(len(cells)), len(self.perturbations)))  # cell by cell

    def finish(self, obs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
        """Perturbations as a categorical in the order given; the settings and the model inputs run into uns."""
        from transcriptformer.perturbation.output import SETTINGS_KEY
        from transcriptformer.version import __version__

        names = [p.name for p in self.perturbations]
        obs = obs.assign(perturbation=pd.Categorical(obs["perturbation"], categories=names))
        affected = obs[obs["affected"].to_numpy(dtype=bool)]
        settings = self.settings
        uns = {
            "knock_out": np.asarray(settings.knock_out, dtype=str),
            "over_express": np.asarray(settings.over_express, dtype=str),
            "top_genes": settings.top_genes,
            "package_version": __version__,
            "inputs_run": len(affected) + affected["cell"].nunique(),
        }
        return obs, {SETTINGS_KEY: uns}

    def summarize(self, obs: pd.DataFrame, outputs: Iterable[GeneOutputs], genes: pd.Index) -> dict:
        """The per-perturbation table and the ranked gene table, from every row's per-gene effects."""
        from transcriptformer.perturbation.output import GENES_KEY, SUMMARY_KEY
        from transcriptformer.perturbation.summary import GENE_EFFECTS, gene_table, perturbation_table

        codes = obs["perturbation"].cat.codes.to_numpy()
        perturbation, column, values, offset = [], [], {key: [] for key in GENE_EFFECTS}, 0
        for chunk in outputs:
            pairs = chunk.gene_values[GENE_EFFECTS[0]].tocoo()
            perturbation.append(codes[offset + pairs.row])
            column.append(pairs.col)
            for key in GENE_EFFECTS:
                values[key].append(chunk.gene_values[key].tocoo().data.astype(np.float64))
            offset += chunk.n_cells
        names = [p.name for p in self.perturbations]
        table = gene_table(
            names,
            np.asarray(genes, dtype=object),
            np.concatenate(perturbation),
            np.concatenate(column).astype(np.int64),
            {key: np.concatenate(v) for key, v in values.items()},
            self.settings.top_genes,
        )
        return {SUMMARY_KEY: perturbation_table(self.perturbations, obs), GENES_KEY: table}

    def output_files(self, config: RunConfig) -> tuple[str, ...]:
        """The tables beside the ``.h5ad``: ``summary.csv``, ``genes.csv`` (and Parquet with pyarrow)."""
        from transcriptformer.perturbation.output import table_files

        return table_files()

    def write_files(self, folder: Path, obs: pd.DataFrame, uns: dict) -> None:
        """The tables of :meth:`summarize`."""
        from transcriptformer.perturbation.output import write_tables

        write_tables(folder, uns)

    def describe(self, uns: dict) -> list[str]:
        """What was run and found: counts, and the per-perturbation table (20 rows at most)."""
        from transcriptformer.perturbation.output import SETTINGS_KEY, SUMMARY_KEY

        summary = uns[SUMMARY_KEY]
        n_rows, n_affected = int(summary["n_cells"].sum()), int(summary["n_affected"].sum())
        columns = ["n_affected", "mean_cosine_shift", "mean_delta_mean_log_likelihood"]
        return [
            f"{len(summary)} perturbation(s) x {n_rows // max(len(summary), 1)} cells: {n_affected} affected, "
            f"{n_rows - n_affected} unaffected (not run); {uns[SETTINGS_KEY]['inputs_run']} model inputs",
            summary[columns].head(20).to_string(float_format=lambda v: f"{v:.4g}"),
        ]
