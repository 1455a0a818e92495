"""Typed configuration: of a TranscriptFormer checkpoint, and of how cells are run through a model.

``config.json`` of a published checkpoint holds ``{"model": {"data_config": ..., "model_config": ...,
"loss_config": ...}}``. Each section maps onto one dataclass below; unknown keys (such as ``_target_``) are
ignored and missing optional keys take their defaults, so one loader serves every published checkpoint.
:class:`PredictSettings` holds the settings of the batch loop (:mod:`transcriptformer.pipeline`) that every use
of a model shares. This module imports nothing heavy, so that the command line can read defaults from it.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from transcriptformer.runtime import PRECISIONS

T = TypeVar("T")

CONFIG_FILE = "config.json"
# The rest of a checkpoint folder (see transcriptformer.checkpoint): its weights and its vocabularies.
WEIGHTS_FILE = "model_weights.pt"
VOCAB_DIR = "vocabs"
DEFAULT_SPECIAL_TOKENS = ["unknown", "[PAD]", "[START]", "[END]", "[RD]", "[CELL]", "[MASK]"]


@dataclass
class DataConfig:
    """How cells are turned into model inputs (SPEC section 4).

    Besides the tokenization settings, three settings of the original release select and order cells for a run
    (its ``inference_config.yaml`` set them, whatever the checkpoint said, so a checkpoint's ``config.json`` does
    not set them here either):

    Attributes
    ----------
    filter_outliers : float
        Keep only the cells whose total count (over the genes read) lies strictly within ``filter_outliers``
        standard deviations of the mean total of their file; ``0``: no filter.
    min_expressed_genes : int
        Keep only the cells with at least this many expressed genes among the genes read; ``0``: no filter.
    randomize_genes : bool
        Order each cell's expressed genes (and, without ``pad_zeros``, its unexpressed ones) at random instead of
        in ``var`` order; the order is drawn from the cell's name, the same in every run. ``sort_genes`` wins.
    """

    aux_cols: list[str] = field(default_factory=list)
    gene_col_name: str = "ensembl_id"
    clip_counts: float | None = 30.0
    filter_to_vocabs: bool = True
    pad_zeros: bool = True
    normalize_to_scale: float = 0.0
    sort_genes: bool = False
    gene_pad_token: str = "[PAD]"
    aux_pad_token: str = "unknown"
    esm2_mappings: list[str] = field(default_factory=list)
    special_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))
    filter_outliers: float = 0.0
    min_expressed_genes: int = 0
    randomize_genes: bool = False

    def __post_init__(self) -> None:
        # Published configs store aux_cols as a comma-separated string or null.
        if self.aux_cols is None:
            self.aux_cols = []
        elif isinstance(self.aux_cols, str):
            self.aux_cols = [c.strip() for c in self.aux_cols.split(",") if c.strip()]
        # Published configs use null for "off"; the inference defaults apply then.
        self.filter_to_vocabs = True if self.filter_to_vocabs is None else bool(self.filter_to_vocabs)
        self.pad_zeros = True if self.pad_zeros is None else bool(self.pad_zeros)
        self.sort_genes = bool(self.sort_genes)
        self.normalize_to_scale = float(self.normalize_to_scale or 0.0)
        if self.filter_outliers < 0:
            raise ValueError(f"filter_outliers must be >= 0 standard deviations (0: off), got {self.filter_outliers}")
        if self.min_expressed_genes < 0:
            raise ValueError(f"min_expressed_genes must be >= 0 (0: off), got {self.min_expressed_genes}")

    @property
    def filters_cells(self) -> bool:
        """Whether a cell filter (``filter_outliers``, ``min_expressed_genes``) is on."""
        return self.filter_outliers > 0 or self.min_expressed_genes > 0


@dataclass
class ModelConfig:
    """Architecture of the transformer (SPEC section 5)."""

    num_layers: int = 12
    num_heads: int = 16
    embed_dim: int = 2048
    model_dim: int = 2048
    seq_len: int = 2047
    aux_len: int = 1
    block_len: int = 128
    softcap: float = 10.0
    log_counts_eps: float = 1e-6
    dropout: float = 0.1
    activation: str = "gelu"
    attn_bias: bool = False
    fw_bias: bool = False
    mu_link_fn: str = "softmax"
    gene_head_hidden_dim: int = 2048

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.mu_link_fn != "softmax":
            raise ValueError(f"mu_link_fn={self.mu_link_fn!r} is not supported; published models use 'softmax'")
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {self.activation!r}")


@dataclass
class LossConfig:
    """Training and likelihood settings (SPEC section 6)."""

    gene_id_loss_weight: float = 1.0
    softplus_approx: bool = True


@dataclass
class TranscriptFormerConfig:
    """Complete configuration of one checkpoint."""

    data_config: DataConfig = field(default_factory=DataConfig)
    model_config: ModelConfig = field(default_factory=ModelConfig)
    loss_config: LossConfig = field(default_factory=LossConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TranscriptFormerConfig:
        """Build a config from the parsed ``config.json`` (with or without its top-level ``model`` key)."""
        section = raw.get("model", raw)
        return cls(
            data_config=_dataclass_from_dict(DataConfig, section.get("data_config") or {}),
            model_config=_dataclass_from_dict(ModelConfig, section.get("model_config") or {}),
            loss_config=_dataclass_from_dict(LossConfig, section.get("loss_config") or {}),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> TranscriptFormerConfig:
        """Read a checkpoint's ``config.json``."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """Return the config in the published ``config.json`` layout."""
        data = dataclasses.asdict(self.data_config)
        data["aux_cols"] = ",".join(data["aux_cols"]) or None
        return {
            "model": {
                "data_config": data,
                "model_config": dataclasses.asdict(self.model_config),
                "loss_config": dataclasses.asdict(self.loss_config),
            }
        }


@dataclass(frozen=True)
class PredictSettings:
    """How cells are run through a model. Results do not depend on ``batch_size`` or ``max_tokens``.

    Attributes
    ----------
    output_keys : tuple of str
        Outputs to compute, names of :data:`transcriptformer.model.outputs.OUTPUTS`.
    batch_size : int
        Cells per forward pass.
    max_tokens : int or None
        Token budget per forward pass (cells x batch length) instead of a fixed ``batch_size``.
    precision : str or None
        ``"32"``, ``"16-mixed"`` or ``"bf16-mixed"``; ``None``: ``16-mixed`` on CUDA, ``32`` elsewhere.
    """

    output_keys: tuple[str, ...] = ("embeddings",)
    batch_size: int = 8
    max_tokens: int | None = None
    precision: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_keys", tuple(dict.fromkeys(self.output_keys)))
        if not self.output_keys:
            raise ValueError("output_keys is empty: ask for at least one output")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


# Keys of published configs that configure the original's data loaders and have no meaning here.
_IGNORED_KEYS = {"_target_", "aux_vocab_path", "pin_memory", "n_data_workers", "esm2_mappings_path"}
# DataConfig settings of a run, not of a checkpoint: the original's inference config reset them.
RUN_DATA_KEYS = {"filter_outliers", "min_expressed_genes", "randomize_genes"}


def _dataclass_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Instantiate ``cls`` from the keys of ``values`` it knows; warn about unexpected ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known - _IGNORED_KEYS)
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown config keys {unknown}", stacklevel=3)
    kwargs = {k: v for k, v in values.items() if k in known and k not in RUN_DATA_KEYS and v is not None}
    return cls(**kwargs)
