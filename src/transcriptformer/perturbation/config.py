"""Settings of an in-silico perturbation run (:mod:`transcriptformer.perturbation`).

This module imports nothing heavy, so that the command line can read the defaults from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PerturbSettings:
    """What to perturb, and how the results are reduced and written.

    How cells run through the model (batch size, token budget, precision) is
    :class:`~transcriptformer.config.PredictSettings`; results depend on none of them, nor on ``chunk_size``.

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
    chunk_size : int
        Model inputs (perturbed cells and the unperturbed cells they are compared with) run and reduced together;
        bounds memory.
    output_path : str
        Folder of the command's output files.
    device : str
        Where the command runs the model: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``mps``.
    """

    knock_out: tuple[str, ...] = ()
    over_express: tuple[str, ...] = ()
    top_genes: int = 50
    chunk_size: int = 4096
    output_path: str = "./perturb_results"
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("knock_out", "over_express"):  # one perturbation may be given as a string
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.knock_out and not self.over_express:
            raise ValueError("nothing to perturb: give at least one knock_out GENE or over_express GENE[=COUNT]")
        if self.top_genes < 0:
            raise ValueError(f"top_genes must be >= 0 (0: every gene), got {self.top_genes}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
