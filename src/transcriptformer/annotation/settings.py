"""Settings of label transfer from a labelled reference; the one place their defaults are written.

It imports nothing heavy, so that a command line can read the defaults at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from transcriptformer.config import check_range, check_types
from transcriptformer.errors import UserError

METRICS = ("cosine", "euclidean")
UNKNOWN = "Unknown"
MAX_NEIGHBORS = 2048  # the most a search returns per query cell (FAISS's limit on a GPU); each gets a row entry


@dataclass(frozen=True)
class AnnotateConfig:
    """How a reference is indexed and how its labels are transferred to query cells.

    Attributes
    ----------
    n_neighbors : int
        Reference cells that vote for each query cell's label.
    metric : str
        ``"cosine"`` (embeddings scaled to unit length, similarity = cosine) or ``"euclidean"``.
    reject : bool
        Call ``"Unknown"`` the query cells whose confidence is below the threshold chosen on the reference.
    false_unknown_rate : float
        The threshold rule: the share of held-out reference cells, labelled correctly by the other reference
        cells, that the threshold calls Unknown (the threshold is this quantile of their confidences).
    calibration_cells : int
        Reference cells (sampled with ``seed``) held out to choose the threshold; all cells of a smaller reference.
    calibration_folds : int
        The calibration cells are held out in this many folds: each fold is labelled by the reference less the fold.
    exact_max_cells : int
        References of up to this many cells are searched exactly (every distance computed); larger ones through
        an approximate, compressed index (FAISS ``IVF<n_lists>,PQ<dimension/2>x4fs,Refine(SQ8)``: 1.25 bytes per
        dimension instead of 4; see :mod:`transcriptformer.annotation.index`).
    n_lists : int or None
        Inverted lists (k-means clusters) of an approximate index; ``None``: the square root of the cell count.
    n_probe : int
        Inverted lists searched per query cell in an approximate index (more: slower, closer to exact search).
    refine_factor : int
        An approximate index ranks ``refine_factor * n_neighbors`` candidates by their 8-bit vectors.
    chunk_cells : int
        Reference cells read and added to the index at a time (memory use of the build).
    seed : int
        Seed of the calibration sample, its folds and the k-means of an approximate index.
    """

    n_neighbors: int = 15
    metric: str = "cosine"
    reject: bool = True
    false_unknown_rate: float = 0.05
    calibration_cells: int = 10_000
    calibration_folds: int = 5
    exact_max_cells: int = 50_000
    n_lists: int | None = None
    n_probe: int = 32
    refine_factor: int = 4
    chunk_cells: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise UserError(f"metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        check_types(self, "")
        check_range(self, "", "n_neighbors", at_least=1, at_most=MAX_NEIGHBORS)
        check_range(self, "", "false_unknown_rate", at_least=0, below=1)
        check_range(self, "", "calibration_folds", at_least=2)
        for name in ("calibration_cells", "exact_max_cells", "n_probe", "refine_factor", "chunk_cells"):
            check_range(self, "", name, at_least=1)
        check_range(self, "", "n_lists", at_least=1, optional=True, also="None: chosen from the reference's size")
        check_range(self, "", "seed", at_least=0)
