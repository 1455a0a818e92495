"""In-silico perturbation: knock genes out of cells or over-express them, and measure what the model predicts.

The machinery of the perturb and screen tasks (:mod:`transcriptformer.tasks.perturb`,
:mod:`transcriptformer.tasks.screen`)::

    specs       GENE names (ids or symbols) and counts        specs.py
    variants    each perturbation applied to each cell,       variants.py
                at the count level; unchanged inputs skipped
    effects     a unit's changed variants and their           effects.py
                unperturbed cells through the one batch loop
    summary     per perturbation and per gene                 summary.py
    output      CSV (and Parquet), perturbations.h5ad         output.py
    screen      every expressed gene of each cell, one at a  screen.py
                time; prefix reuse; goal shift; null and FDR

Definitions and caveats: ``docs/perturb.md``.
"""
