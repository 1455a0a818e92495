"""The results of a perturbation run, and its output folder.

::

    summary.csv         one row per perturbation (transcriptformer.perturbation.summary.perturbation_table)
    genes.csv           the ranked table of affected genes, top_genes per perturbation (gene_table)
    summary.parquet, genes.parquet
                        the same tables, when pyarrow is installed
    perturbations.h5ad  one row per (perturbation, cell), written last:
        obs             perturbation, cell, affected, cosine_shift, delta_log_likelihood,
                        delta_mean_log_likelihood, total_count_before, total_count_after
                        (obs_names "<perturbation>|<cell>"; cell by cell in input order, and for each cell
                        perturbation by perturbation: the order depends on no setting of the run)
        var             the gene axis: the genes of the input that the model reads, index gene_id
        X, layers       delta_mu (X and layers), log2_fold_change, delta_share, log2_share_fold_change, sparse:
                        an entry for each gene in the cell's sequence before and after, other than the perturbed
                        ones; rows of unaffected cells are empty
        uns["perturb"]  the settings, the package version and the model inputs run;
                        uns["perturbation_summary"], uns["perturbation_genes"]: the two tables

``transcriptformer perturb`` writes the folder through the engine: the tables and the ``.h5ad`` appear together or
not at all, and existing ones are replaced only with ``overwrite``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import pandas as pd

from transcriptformer.engine.output import claim_output, remove_stale_temporaries, write_anndata
from transcriptformer.perturbation.summary import GENE_EFFECTS, gene_symbols

if TYPE_CHECKING:
    from transcriptformer.engine.run import MemoryResult

CELLS_FILE = "perturbations.h5ad"
# uns keys of the settings and of the two tables.
SETTINGS_KEY, SUMMARY_KEY, GENES_KEY = "perturb", "perturbation_summary", "perturbation_genes"
# The tables' files beside CELLS_FILE, by uns key: CSV, and Parquet when pyarrow is installed.
TABLES = {SUMMARY_KEY: "summary", GENES_KEY: "genes"}


def table_files() -> tuple[str, ...]:
    """The names of the tables' files."""
    formats = ("csv", "parquet") if importlib.util.find_spec("pyarrow") is not None else ("csv",)
    return tuple(f"{name}.{suffix}" for name in TABLES.values() for suffix in formats)


def write_tables(folder: Path, uns: dict) -> None:
    """Write the tables of ``uns`` into ``folder`` (:func:`table_files`)."""
    names = set(table_files())
    for key, name in TABLES.items():
        table = uns[key]
        table.to_csv(folder / f"{name}.csv", index=key == SUMMARY_KEY)
        if f"{name}.parquet" in names:
            table.to_parquet(folder / f"{name}.parquet")


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

    @classmethod
    def from_memory(cls, result: MemoryResult) -> PerturbationResult:
        """The result of an in-memory run of the perturb task (:func:`~transcriptformer.engine.run.run_in_memory`)."""
        gene_ids = result.gene_ids.astype(str)
        var = pd.DataFrame({"symbol": gene_symbols(gene_ids)}, index=pd.Index(gene_ids, name="gene_id"))
        layers = {key: result.outputs.gene_values[key] for key in GENE_EFFECTS}
        uns = {key: result.uns[key] for key in (SETTINGS_KEY, SUMMARY_KEY, GENES_KEY)}
        cells = ad.AnnData(X=layers[GENE_EFFECTS[0]], obs=result.obs, var=var, layers=layers, uns=uns)
        return cls(result.uns[SUMMARY_KEY], result.uns[GENES_KEY], cells)

    @property
    def inputs_run(self) -> int:
        """Model inputs run: the changed variants and the cells they are compared with."""
        return int(self.cells.uns[SETTINGS_KEY]["inputs_run"])

    def write(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the output folder (module docstring), holding it while writing; returns ``perturbations.h5ad``.

        Raises
        ------
        FileExistsError
            When the folder holds a result and ``overwrite`` is off.
        """
        path = Path(folder) / CELLS_FILE
        with claim_output(path, overwrite, beside=table_files()):
            remove_stale_temporaries(path)
            write_tables(path.parent, self.cells.uns)
            write_anndata(self.cells, path)
        return path
