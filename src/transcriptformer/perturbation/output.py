"""The results of a perturbation run, and its output folder.

::

    summary.csv         one row per perturbation (transcriptformer.perturbation.summary.perturbation_table)
    genes.csv           the ranked table of affected genes, top_genes per perturbation (gene_table)
    summary.parquet, genes.parquet
                        the same tables, when pyarrow is installed
    perturbations.h5ad  one row per (perturbation, cell), written last:
        obs             perturbation, cell, affected, cosine_shift, delta_log_likelihood,
                        delta_mean_log_likelihood, total_count_before, total_count_after
                        (obs_names "<perturbation>|<cell>", perturbation by perturbation)
        var             the gene axis: the genes of the file that the model reads, then perturbed genes that
                        the file lacks (in_data False); index gene_id, column symbol
        X               delta_mu, sparse: an entry for each gene in the cell's sequence before and after,
                        other than the perturbed ones; rows of unaffected cells are empty
        layers          log2_fold_change, delta_share, log2_share_fold_change (same entries)
        uns["perturb"]  the settings, the package version and the model inputs run

The folder is held like an inference output (:func:`transcriptformer.engine.output.claim_output`): a lock
file beside ``perturbations.h5ad`` keeps a second run out, and an existing result is kept unless ``overwrite``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from transcriptformer.engine.output import claim_output, remove_stale_temporaries, write_anndata
from transcriptformer.perturbation.config import PerturbSettings
from transcriptformer.perturbation.summary import GENE_EFFECTS, MEAN_OF, gene_symbols, gene_table, perturbation_table
from transcriptformer.version import __version__

if TYPE_CHECKING:
    from transcriptformer.perturbation.effects import Effects
    from transcriptformer.perturbation.variants import Variants

CELLS_FILE = "perturbations.h5ad"


@dataclass
class PerturbationResult:
    """What a perturbation run found.

    Attributes
    ----------
    summary : pandas.DataFrame
        One row per perturbation, indexed by its name.
    genes : pandas.DataFrame
        The most affected genes of each perturbation, ranked.
    cells : anndata.AnnData
        One row per (perturbation, cell); layout in the module docstring.
    """

    summary: pd.DataFrame
    genes: pd.DataFrame
    cells: ad.AnnData

    @property
    def inputs_run(self) -> int:
        """Model inputs run: the changed variants and the cells they are compared with."""
        return int(self.cells.uns["perturb"]["inputs_run"])

    def report(self, seconds: float) -> str:
        """What was run and found, for the command's summary (the per-perturbation table, 20 rows at most)."""
        obs = self.cells.obs
        n_affected = int(obs["affected"].sum())
        columns = ["n_affected", "mean_cosine_shift", "mean_delta_mean_log_likelihood"]
        lines = [
            f"{len(self.summary)} perturbation(s) x {self.cells.n_obs // max(len(self.summary), 1)} cells: "
            f"{n_affected} affected, {len(obs) - n_affected} unaffected (not run)",
            f"{self.inputs_run} model inputs (perturbed and unperturbed cells) in {seconds:.1f} s "
            f"({self.inputs_run / max(seconds, 1e-9):.1f} cells/s)",
            self.summary[columns].head(20).to_string(float_format=lambda v: f"{v:.4g}"),
        ]
        return "\n".join(lines)

    def write(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the output folder (module docstring), holding it while writing; returns ``perturbations.h5ad``.

        Raises
        ------
        FileExistsError
            When the folder holds a result and ``overwrite`` is off.
        """
        path = Path(folder) / CELLS_FILE
        with claim_output(path, overwrite):
            return self.write_files(folder)

    def write_files(self, folder: str | Path) -> Path:
        """Write the output files into ``folder``, which the caller holds (:func:`claim_output`)."""
        folder = Path(folder)
        tables = {"summary": self.summary, "genes": self.genes}
        for name, table in tables.items():
            table.to_csv(folder / f"{name}.csv", index=name == "summary")
            if importlib.util.find_spec("pyarrow") is not None:
                table.to_parquet(folder / f"{name}.parquet")
        path = folder / CELLS_FILE
        remove_stale_temporaries(path)
        write_anndata(self.cells, path)
        return path


def grid_index(variants: Variants, effects: Effects) -> np.ndarray:
    """Row of each changed variant among all (perturbation, cell) pairs, perturbation by perturbation."""
    return effects.perturbation * len(variants.cells) + effects.cell


def cells_obs(variants: Variants, effects: Effects) -> pd.DataFrame:
    """One row per (perturbation, cell): its effects, 0 for a variant that is unaffected."""
    names = [p.name for p in variants.perturbations]
    n_cells = len(variants.cells)
    rows = grid_index(variants, effects)
    size = len(names) * n_cells
    cell_names = np.tile(np.asarray(variants.cells.obs_names, dtype=str), len(names))
    perturbation = np.repeat(np.asarray(names, dtype=object), n_cells)
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(perturbation, categories=names),
            "cell": cell_names,
            "affected": np.isin(np.arange(size), rows),
        },
        index=pd.Index([f"{p}|{c}" for p, c in zip(perturbation, cell_names, strict=True)]),
    )
    for key in MEAN_OF:
        obs[key] = np.zeros(size)
        obs.iloc[rows, obs.columns.get_loc(key)] = getattr(effects, key)
    obs["total_count_before"] = np.tile(variants.totals, len(names))
    obs["total_count_after"] = obs["total_count_before"].to_numpy()
    obs.iloc[rows, obs.columns.get_loc("total_count_after")] = effects.total_after
    return obs


def gene_var(variants: Variants) -> pd.DataFrame:
    """The gene axis: id, symbol, and whether the file has the gene."""
    gene_ids = np.asarray(variants.cells.gene_ids, dtype=str)
    var = pd.DataFrame(
        {"symbol": gene_symbols(gene_ids), "in_data": np.arange(len(gene_ids)) < variants.n_data_genes},
        index=pd.Index(gene_ids, name="gene_id"),
    )
    return var


def build_result(
    variants: Variants, effects: Effects, settings: PerturbSettings, inputs_run: int
) -> PerturbationResult:
    """Tables and AnnData of a run's effects."""
    obs = cells_obs(variants, effects)
    rows = grid_index(variants, effects)[effects.variant]
    shape = (len(obs), variants.n_genes)
    matrices = {
        key: sp.csr_matrix((getattr(effects, key).astype(np.float32), (rows, effects.column)), shape=shape)
        for key in GENE_EFFECTS
    }
    values = {key: getattr(effects, key) for key in GENE_EFFECTS}
    names = [p.name for p in variants.perturbations]
    gene_ids = np.asarray(variants.cells.gene_ids, dtype=object)
    genes = gene_table(
        names, gene_ids, effects.perturbation[effects.variant], effects.column, values, settings.top_genes
    )
    uns = {
        "knock_out": np.asarray(settings.knock_out, dtype=str),
        "over_express": np.asarray(settings.over_express, dtype=str),
        "top_genes": settings.top_genes,
        "chunk_size": settings.chunk_size,
        "package_version": __version__,
        "inputs_run": inputs_run,
    }
    cells = ad.AnnData(
        X=matrices["delta_mu"],
        obs=obs,
        var=gene_var(variants),
        layers={key: matrices[key] for key in GENE_EFFECTS[1:]},
        uns={"perturb": uns},
    )
    return PerturbationResult(perturbation_table(variants.perturbations, obs), genes, cells)
