"""Data files bundled with the package: gene symbol tables (see :mod:`transcriptformer.data.gene_symbols`)."""
