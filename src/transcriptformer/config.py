"""Typed configuration: of a TranscriptFormer checkpoint, and of how cells are run through a model.

``config.json`` of a published checkpoint holds ``{"model": {"data_config": ..., "model_config": ...,
"loss_config": ...}}``. Each section maps onto one dataclass below; unknown keys (such as ``_target_``) are
ignored and missing optional keys take their defaults, so one loader serves every published checkpoint.
:class:`PredictConfig` holds the settings of the batch loop (:mod:`transcriptformer.pipeline`) that every use
of a model shares. This module imports nothing heavy, so that the command line can read defaults from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import types
import typing
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
# What to do with count entries that are NaN, infinite or negative (DataConfig.invalid_counts).
INVALID_COUNTS = ("error", "drop", "clip")


@dataclass
class DataConfig:
    """How cells are turned into model inputs (SPEC section 4).

    Besides the tokenization settings, three settings of the original release select and order cells for a run
    (its ``inference_config.yaml`` set them, whatever the checkpoint said, so a checkpoint's ``config.json`` does
    not set them here either), and two more say what happens to cells the model cannot read as they are:

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
    invalid_counts : {"error", "drop", "clip"}
        Count entries (of the genes read) that are NaN, infinite or negative: ``error`` stops with the file, the
        number of entries and the first cell and gene; ``drop`` leaves out the cells that hold them; ``clip`` sets
        NaN and negative entries to 0 and infinite ones to ``clip_counts``.
    drop_empty_cells : bool
        Leave out the cells without any count among the genes read. Kept, such a cell has NaN outputs (a count
        of them is reported), never a normal-looking embedding.
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
    invalid_counts: str = "error"
    drop_empty_cells: bool = False

    def __post_init__(self) -> None:
        # Published configs store aux_cols as a comma-separated string or null.
        if self.aux_cols is None:
            self.aux_cols = []
        elif isinstance(self.aux_cols, str):
            self.aux_cols = [c.strip() for c in self.aux_cols.split(",") if c.strip()]
        # Published configs use null for "off"; the inference defaults apply then.
        self.filter_to_vocabs = True if self.filter_to_vocabs is None else self.filter_to_vocabs
        self.pad_zeros = True if self.pad_zeros is None else self.pad_zeros
        self.sort_genes = False if self.sort_genes is None else self.sort_genes
        self.normalize_to_scale = 0.0 if self.normalize_to_scale is None else self.normalize_to_scale
        check_types(self, "data_config")
        if self.clip_counts is not None:
            check_range(self, "data_config", "clip_counts", above=0, also="null: no clipping")
        check_range(self, "data_config", "normalize_to_scale", at_least=0, also="0: no normalisation")
        check_range(self, "data_config", "filter_outliers", at_least=0, also="standard deviations, 0: off")
        check_range(self, "data_config", "min_expressed_genes", at_least=0, also="0: off")
        if self.invalid_counts not in INVALID_COUNTS:
            raise ValueError(f"data_config.invalid_counts must be one of {INVALID_COUNTS}, got {self.invalid_counts!r}")


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
        check_types(self, "model_config")
        for name in (
            "num_layers",
            "num_heads",
            "embed_dim",
            "model_dim",
            "seq_len",
            "block_len",
            "gene_head_hidden_dim",
        ):
            check_range(self, "model_config", name, at_least=1)
        check_range(self, "model_config", "aux_len", at_least=0)
        check_range(self, "model_config", "softcap", at_least=0, also="0: no softcap")
        check_range(self, "model_config", "log_counts_eps", above=0)
        check_range(self, "model_config", "dropout", at_least=0, below=1)
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

    def __post_init__(self) -> None:
        check_types(self, "loss_config")
        check_range(self, "loss_config", "gene_id_loss_weight", at_least=0, also="0: no gene-id head")


@dataclass
class TranscriptFormerConfig:
    """Complete configuration of one checkpoint."""

    data_config: DataConfig = field(default_factory=DataConfig)
    model_config: ModelConfig = field(default_factory=ModelConfig)
    loss_config: LossConfig = field(default_factory=LossConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TranscriptFormerConfig:
        """Build a config from the parsed ``config.json`` (with or without its top-level ``model`` key).

        Raises
        ------
        ValueError
            When a section is not a mapping, or a setting has the wrong type or lies out of range (named).
        """
        raw = _mapping(raw, "the config")
        section = _mapping(raw.get("model", raw), "model")
        return cls(
            data_config=_dataclass_from_dict(DataConfig, _mapping(section.get("data_config"), "data_config")),
            model_config=_dataclass_from_dict(ModelConfig, _mapping(section.get("model_config"), "model_config")),
            loss_config=_dataclass_from_dict(LossConfig, _mapping(section.get("loss_config"), "loss_config")),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> TranscriptFormerConfig:
        """Read a checkpoint's ``config.json``; an error names the file and the setting that is wrong."""
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a JSON text file; restore the checkpoint's config.json") from None
        except ValueError as error:  # json.JSONDecodeError included
            raise ValueError(f"{path}: {error}; fix it or restore the checkpoint's config.json") from None

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
class PredictConfig:
    """How cells are run through a model. Results do not depend on ``batch_size`` or ``max_tokens``.

    Attributes
    ----------
    output_keys : tuple of str
        Outputs to compute, names of :data:`transcriptformer.model.outputs.OUTPUTS`.
    batch_size : int
        Cells per forward pass at most (fewer where their lengths differ much: see
        :func:`~transcriptformer.data.batching.plan_batches`).
    max_tokens : int or None
        Token budget per forward pass (cells x batch length) instead of a fixed ``batch_size``.
    precision : str or None
        ``"32"``, ``"16-mixed"`` or ``"bf16-mixed"``; ``None``: ``16-mixed`` on CUDA, ``32`` elsewhere.
    embedding_layer_index : int
        The layer whose output the cell embedding pools: 0 the first, negative from the end; -1, the last layer, as
        the original release (Geneformer's ``emb_layer``).
    """

    output_keys: tuple[str, ...] = ("embeddings",)
    batch_size: int = 8
    max_tokens: int | None = None
    precision: str | None = None
    embedding_layer_index: int = -1

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_keys", tuple(dict.fromkeys(self.output_keys)))
        if not self.output_keys:
            raise ValueError("output_keys is empty: ask for at least one output")
        check_range(self, "", "batch_size", at_least=1)
        check_range(self, "", "max_tokens", at_least=1, optional=True)
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


# Cells of a SOMA query per block of its obs (joinids, names, columns) read at a time (InputConfig.soma_block_cells).
SOMA_BLOCK_CELLS = 65_536

# Cells of one generate run at most: its plan, output matrix and obs are held in memory (run again with another
# seed for more cells). Genes per cell at most: more than any vocabulary holds.
MAX_GENERATED_CELLS = 1_000_000
MAX_GENES = 1_000_000


@dataclass(frozen=True)
class SamplingConfig:
    """How cells are sampled from a model (``transcriptformer generate``; docs/generate.md).

    Attributes
    ----------
    num_cells : int or None
        Cells to generate (at most :data:`MAX_GENERATED_CELLS`); ``None``: one per prompt cell, else an error.
    max_genes : int or None
        Genes per cell at most; ``None``: the model's ``seq_len``.
    temperature : float
        Divides the gene-id logits; 1 samples the model's distribution.
    top_k : int
        Sample the next gene among the ``top_k`` most likely; 0: all.
    top_p : float
        Sample among the most likely genes that make up ``top_p`` of the probability; 1: all.
    seed : int
        Cell ``i`` of a run draws its random numbers from ``(seed, i)``: the same cell whatever the batch size;
        ``0 <= seed < 2**63``.
    batch_size : int
        Cells generated together.
    library_size : float or None
        Total count of a generated cell over ``num_genes`` genes (on the model's input scale: after clipping);
        ``None``: that of its prompt cell.
    num_genes : int or None
        Genes a generated cell aims at (fewer if the model emits ``[END]``); ``None``: its prompt cell's, else
        ``max_genes``.
    prompt_genes : int
        Start each cell with the first genes (and counts) of its prompt cell.
    use_cache : bool
        Decode with the key/value cache (one query per layer and gene); ``False`` reruns the whole sequence at
        every step (the reference the cache is tested against).
    """

    num_cells: int | None = None
    max_genes: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32
    library_size: float | None = None
    num_genes: int | None = None
    prompt_genes: int = 0
    use_cache: bool = True

    def __post_init__(self) -> None:
        check_types(self, "")
        if self.num_cells is not None:
            more = "for more cells, run again with another seed"
            check_range(self, "", "num_cells", at_least=1, at_most=MAX_GENERATED_CELLS, also=more)
        for name in ("max_genes", "num_genes"):
            if getattr(self, name) is not None:
                check_range(self, "", name, at_least=1, at_most=MAX_GENES)
        check_range(self, "", "batch_size", at_least=1, at_most=MAX_GENERATED_CELLS)
        check_range(self, "", "temperature", above=0, also="1: the model's distribution")
        check_range(self, "", "top_k", at_least=0, at_most=MAX_GENES, also="0: all genes")
        check_range(self, "", "top_p", above=0, at_most=1, also="1: all genes")
        check_range(self, "", "seed", at_least=0, below=2**63, also="it is stored as a 64-bit integer")
        if self.library_size is not None:
            check_range(self, "", "library_size", above=0)
        check_range(self, "", "prompt_genes", at_least=0, at_most=MAX_GENES)


# Keys of published configs that configure the original's data loaders and have no meaning here.
_IGNORED_KEYS = {"_target_", "aux_vocab_path", "pin_memory", "n_data_workers", "esm2_mappings_path"}
# DataConfig settings of a run, not of a checkpoint: the original's inference config reset them.
RUN_DATA_KEYS = {"filter_outliers", "min_expressed_genes", "randomize_genes", "invalid_counts", "drop_empty_cells"}


def _mapping(value: Any, name: str) -> dict[str, Any]:
    """``value`` when it is a JSON object, ``{}`` for null; otherwise an error naming ``name``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object of settings, got {type(value).__name__} {value!r:.60}")
    return value


def check_types(settings: Any, section: str) -> None:
    """Raise a ``ValueError`` naming ``section.field`` when a field of a dataclass does not hold its declared type.

    ``int`` fields take integers (not booleans; NumPy's too), ``float`` fields take integers and floats, ``bool``
    fields take only booleans, ``list[str]`` fields take lists of strings. With an empty ``section`` the message
    names the field alone.
    """
    hints = typing.get_type_hints(type(settings))
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if not _has_type(value, hints[item.name]):
            name = f"{section}.{item.name}" if section else item.name
            raise ValueError(f"{name} must be {_type_name(hints[item.name])}, got {value!r:.80}")


def check_range(
    settings: Any,
    section: str,
    name: str,
    *,
    at_least: float | None = None,
    above: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    also: str = "",
    optional: bool = False,
    off: float | None = None,
) -> None:
    """Raise a ``ValueError`` naming ``section.name`` when the number is not finite or lies out of the range.

    ``section`` is the prefix of the name in the message (``data_config``), or ``""`` for a bare parameter name (a
    keyword of the API, which the command line turns into its flag); with ``optional``, ``None`` is accepted (the
    setting is off); ``off``, a number outside the range that turns the setting off (``-1``: no limit), is
    accepted too (say what it means in ``also``).
    """
    value = getattr(settings, name)
    if (optional and value is None) or (off is not None and value == off and not isinstance(value, bool)):
        return
    check_number(
        value,
        f"{section}.{name}" if section else name,
        at_least=at_least,
        above=above,
        below=below,
        at_most=at_most,
        also=also,
    )


def check_number(
    value: Any,
    name: str,
    *,
    at_least: float | None = None,
    above: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    also: str = "",
) -> None:
    """Raise a ``ValueError`` naming ``name`` when ``value`` is not a finite number inside the range.

    Integers of any size are compared exactly (no conversion to float); booleans are not numbers here.
    """
    bounds = [f">= {at_least}" if at_least is not None else "", f"> {above}" if above is not None else ""]
    bounds += [f"< {below}" if below is not None else "", f"<= {at_most}" if at_most is not None else ""]
    inside = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and (isinstance(value, numbers.Integral) or math.isfinite(value))
        and (at_least is None or value >= at_least)
        and (above is None or value > above)
        and (below is None or value < below)
        and (at_most is None or value <= at_most)
    )
    if not inside:
        extra = f" ({also})" if also else ""
        wanted = " and ".join(["finite"] * _is_not_finite(value) + [b for b in bounds if b])
        raise ValueError(f"{name} must be {wanted}{extra}, got {value!r:.80}")


def _is_not_finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value)


def _has_type(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_has_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if typing.get_origin(hint) is tuple:  # tuple[X, ...]
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_has_type(v, item) for v in value)
    if typing.get_origin(hint) is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_has_type(k, key) and _has_type(v, item) for k, v in value.items())
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        return f"a list of {_type_name(typing.get_args(hint)[0]).split(' ', 1)[-1]}s"
    if typing.get_origin(hint) is dict:
        return f"a mapping of {_type_name(typing.get_args(hint)[1]).split(' ', 1)[-1]}s"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _dataclass_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Instantiate ``cls`` from the keys of ``values`` it knows; warn about unexpected ones.

    A whole number of a ``float`` setting (``"softcap": 10``) becomes a float, as an override sets it, so that the
    settings of a run read the same whichever way they were set (what a resumed run compares).
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known - _IGNORED_KEYS)
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown config keys {unknown}", stacklevel=3)
    hints = typing.get_type_hints(cls)
    kwargs = {k: v for k, v in values.items() if k in known and k not in RUN_DATA_KEYS and v is not None}
    return cls(**{k: _as_float(v) if _has_type(1.5, hints[k]) else v for k, v in kwargs.items()})


def _as_float(value: Any) -> Any:
    """A whole number (not a boolean) as a float; any other value as it is (for the type check to name)."""
    is_whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return float(value) if is_whole else value
