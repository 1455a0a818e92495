"""In-silico perturbation: knock genes out of cells or over-express them, and measure what the model predicts.

>>> from transcriptformer.perturbation import PerturbSettings, perturb_cells

::

    specs       GENE names (ids or symbols) and counts        specs.py
    variants    each perturbation applied to each cell,       variants.py
                at the count level; unchanged inputs skipped
    effects     the changed variants and their unperturbed    effects.py
                cells through the one batch loop, in chunks
    summary     per perturbation and per gene                 summary.py
    output      CSV (and Parquet), perturbations.h5ad         output.py

Definitions and caveats: ``docs/perturb.md``. The names below are imported on first use, so that reading the
settings does not load torch.
"""

import importlib

_EXPORTS = {
    "PerturbSettings": "transcriptformer.perturbation.config",
    "PerturbationResult": "transcriptformer.perturbation.output",
    "perturb_cells": "transcriptformer.perturbation.effects",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
