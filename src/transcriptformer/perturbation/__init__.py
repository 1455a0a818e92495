"""In-silico perturbation: knock genes out of cells or over-express them, and measure what the model predicts.

The machinery of the perturb task (:mod:`transcriptformer.tasks.perturb`)::

    specs       GENE names (ids or symbols) and counts        specs.py
    variants    each perturbation applied to each cell,       variants.py
                at the count level; unchanged inputs skipped
    effects     a unit's changed variants and their           effects.py
                unperturbed cells through the one batch loop
    summary     per perturbation and per gene                 summary.py
    output      CSV (and Parquet), perturbations.h5ad         output.py

Definitions and caveats: ``docs/perturb.md``.
"""
