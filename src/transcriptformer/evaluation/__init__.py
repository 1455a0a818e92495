"""``transcriptformer evaluate``: are a model's embeddings good for these cells? Compared with baselines.

:class:`~transcriptformer.evaluation.config.EvaluateConfig` holds the settings, :mod:`.embeddings` gathers what is
compared (``obsm`` keys, checkpoints with adapters, the PCA and ``esm2ce`` baselines), :mod:`.tasks` computes the
metrics, :mod:`.report` writes the table, JSON and figures, and :func:`transcriptformer.evaluation.run.evaluate`
runs it all. The libraries it needs (scanpy, scikit-learn, matplotlib, igraph) come with the ``evaluate`` extra;
this module imports none of them.
"""

from __future__ import annotations

import importlib.util

from transcriptformer.errors import UserError

# Import name -> distribution name of what evaluate needs beyond the package's own dependencies.
EXTRA_MODULES = {"scanpy": "scanpy", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "igraph": "igraph"}
INSTALL_EXTRA = 'pip install "transcriptformer[evaluate]"'


def require_extra() -> None:
    """Raise a :class:`UserError` naming the install command when a library of the ``evaluate`` extra is missing."""
    missing = [dist for module, dist in EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"evaluate needs {', '.join(missing)}, not installed here: {INSTALL_EXTRA}")
