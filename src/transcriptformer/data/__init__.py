"""Data pipeline: vocabularies and AnnData tokenization."""
