"""Typed settings of ``transcriptformer evaluate``; the command line reads its defaults from here.

It imports nothing heavy, so that ``transcriptformer evaluate --help`` answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transcriptformer.config import PredictConfig
from transcriptformer.engine.config import default_output_path
from transcriptformer.runtime import DEVICES
from transcriptformer.training.config import SEED_LIMIT

# cz-benchmarks' defaults (src/czbenchmarks/tasks/constants.py: RANDOM_SEED, N_FOLDS, MIN_CLASS_SIZE) and its PCA
# baseline (src/czbenchmarks/tasks/utils.py: run_standard_scrna_workflow: 3,000 genes, 50 components).
CZ_BENCHMARKS_SEED = 42
# How cross-species label prediction aggregates a sample's cells (cz-benchmarks' aggregation_method).
SAMPLE_AGGREGATIONS = ("mean", "median")


@dataclass
class EvaluateConfig:
    """What to evaluate, on which cells, and where to write the report.

    Attributes
    ----------
    data_file : str
        ``.h5ad`` file with the counts (``raw.X`` when present, else ``X``) and the label column in ``obs``.
    label_key : str
        ``obs`` column of the cell labels (cell types) that the embeddings should separate.
    batch_key : str or None
        ``obs`` column of the batches; given, batch mixing is measured.
    species_key : str or None
        ``obs`` column of the species; given, cross-species integration is measured and labels are transferred from
        each species to each other one.
    sample_key : str or None
        ``obs`` column of the samples (donors); with ``species_key``, cross-species label prediction classifies the
        samples' aggregated embeddings (a sample's label is its first cell's), as cz-benchmarks does.
    sample_aggregation : str
        How a sample's cells make its embedding: ``mean`` or ``median`` of each dimension (cz-benchmarks'
        ``aggregation_method``).
    time_key : str or None
        ``obs`` column of a numeric time (a time point, a developmental stage in days); given, the sequential
        organisation of the embedding is measured (cz-benchmarks' ``SequentialOrganizationTask``).
    perturbation_key : str or None
        ``obs`` column of the perturbation of each cell (``control_value`` for control cells, else the gene or genes
        perturbed, ``A+B`` for several); given, each checkpoint's ``perturb`` predictions are judged by cz-benchmarks'
        perturbation-expression prediction (``PerturbationExpressionPredictionTask``).
    control_value : str
        The value of ``perturbation_key`` that marks control cells (cz-benchmarks' default).
    checkpoint_path : list of str
        Checkpoints (folders or published names) whose embeddings are computed in the run; each also gives the
        ``esm2ce`` baseline over its gene-embedding table.
    adapter : list of str
        LoRA adapter folders (from ``transcriptformer finetune``) of the one checkpoint; each is evaluated beside it.
    obsm_key : list of str
        Embeddings already in the file's ``obsm``, compared side by side with the others.
    output_path : str
        Folder of the report: ``results.json``, ``umap.png``, ``metrics.png``.
    seed : int
        Seed of the folds, the classifiers, PCA, Leiden, UMAP and the cells sampled for silhouettes.
    n_folds : int
        Stratified cross-validation folds of label prediction.
    min_class_size : int
        Classes with fewer cells are left out of label prediction (they cannot fill every fold).
    knn_neighbors : int
        Neighbours of the unscaled kNN classifier and of the graph that Leiden clusters and UMAP lays out.
    n_top_genes : int
        Highly variable genes of the PCA baseline (all genes when the file has fewer).
    n_pcs : int
        Components of the PCA baseline.
    entropy_neighbors : int
        Neighbourhood size of the batch entropy.
    sample_cells : int
        Silhouettes and the batch entropy are averaged over at most this many cells, sampled with ``seed`` (the
        cost of a silhouette grows with the square of the number of cells).
    batch_size : int
        Cells per forward pass of a checkpoint; results do not depend on it.
    device : str
        Where checkpoints run: ``auto``, ``cpu``, ``cuda`` or ``mps``.
    sequential_neighbors : int
        Neighbours of each cell whose times are compared with its own in the sequential alignment.
    save_embeddings : bool
        Also write ``embeddings.h5ad`` into the report: the evaluated cells (their ``obs``) with every method's
        embedding in ``obsm``, under its name in the report.
    overwrite : bool
        Replace a report already in ``output_path``.
    """

    data_file: str = ""
    label_key: str = ""
    batch_key: str | None = None
    species_key: str | None = None
    sample_key: str | None = None
    sample_aggregation: str = "mean"
    time_key: str | None = None
    perturbation_key: str | None = None
    control_value: str = "ctrl"
    checkpoint_path: list[str] = field(default_factory=list)
    adapter: list[str] = field(default_factory=list)
    obsm_key: list[str] = field(default_factory=list)
    output_path: str = default_output_path("evaluate")
    seed: int = CZ_BENCHMARKS_SEED
    n_folds: int = 5
    min_class_size: int = 10
    knn_neighbors: int = 15
    n_top_genes: int = 3000
    n_pcs: int = 50
    entropy_neighbors: int = 200
    sample_cells: int = 10_000
    batch_size: int = PredictConfig.batch_size
    device: str = "auto"
    sequential_neighbors: int = 15
    save_embeddings: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.data_file:
            raise ValueError("data_file is empty: give the .h5ad file of the cells")
        if not self.label_key:
            raise ValueError("label_key is empty: give the obs column of the cell labels")
        if self.sample_aggregation not in SAMPLE_AGGREGATIONS:
            raise ValueError(
                f"sample_aggregation must be one of {list(SAMPLE_AGGREGATIONS)}, not {self.sample_aggregation!r}"
            )
        if self.sample_key and not self.species_key:
            raise ValueError("sample_key is used by cross-species label prediction: give species_key too")
        if self.perturbation_key and not self.checkpoint_path:
            raise ValueError(
                "perturbation_key judges a model's perturb predictions: give checkpoint_path (the model to perturb)"
            )
        if self.adapter and len(self.checkpoint_path) != 1:
            raise ValueError(
                f"{len(self.adapter)} adapter(s) need the one checkpoint they were trained on: give exactly one "
                f"checkpoint_path (got {len(self.checkpoint_path)})"
            )
        for name in (
            "n_folds",
            "min_class_size",
            "knn_neighbors",
            "n_top_genes",
            "n_pcs",
            "entropy_neighbors",
            "sequential_neighbors",
        ):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2, got {getattr(self, name)}")
        if self.sample_cells < 2:
            raise ValueError(f"sample_cells must be at least 2, got {self.sample_cells}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        for name in ("batch_key", "species_key", "sample_key", "time_key", "perturbation_key"):
            if getattr(self, name) == self.label_key:
                raise ValueError(f"{name} is the label column {self.label_key!r}: name another obs column")
        for name in ("checkpoint_path", "adapter", "obsm_key"):
            repeated = sorted({value for value in getattr(self, name) if getattr(self, name).count(value) > 1})
            if repeated:
                raise ValueError(f"{name} {repeated[0]!r} is given twice: give each one once")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be >= 0 and < {SEED_LIMIT} (numpy's seeds), got {self.seed}")
