"""LoRA adapters for TranscriptFormer through ``peft``: wrap, save, load, merge.

Adapters are saved alone in the ``peft`` layout, which Hugging Face users know::

    <adapter>/adapter_config.json        rank, alpha, dropout, target modules, base checkpoint path
    <adapter>/adapter_model.safetensors  the adapter (and trained head) weights only; its metadata records the
                                         SHA-256 of the base checkpoint's weights file, checked at load
    <adapter>/README.md                  what they are: base checkpoint, LoRA settings, how to load them

>>> from transcriptformer.checkpoint import load_checkpoint
>>> checkpoint = load_checkpoint("checkpoints/tf_sapiens", adapter="adapters/my_cells")  # merged weights

``peft`` (and with it torch) is imported when adapters are first used, so that :class:`LoraConfig` can be read
without it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transcriptformer.config import check_number
from transcriptformer.errors import UserError
from transcriptformer.safe_load import check_safetensors, sha256_of

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from torch import nn

    from transcriptformer.model.transcriptformer import TranscriptFormer

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MODEL_CARD_FILE = "README.md"
# The key, in the metadata of the adapter weights file, of the SHA-256 of the base checkpoint's weights file.
BASE_WEIGHTS_KEY = "base_weights_sha256"

MODEL_CARD = """\
---
library_name: peft
tags:
- transcriptformer
- lora
---

# LoRA adapters for TranscriptFormer

Adapters of the base checkpoint `{base}`, saved by transcriptformer {version} (peft {peft_version}). This folder
holds the adapter weights (and trained copies of heads) only; they are applied to the base weights when loaded.

| setting | value |
|---|---|
| rank `r` | {r} |
| `lora_alpha` | {alpha} |
| `lora_dropout` | {dropout} |
| adapted layers | {targets} |
| fully trained copies | {heads} |

## Loading

```bash
transcriptformer inference --checkpoint-path {base} --adapter {path} --data-file cells.h5ad
transcriptformer merge-adapters --checkpoint-path {base} --adapter {path} \\
    --output-path merged_checkpoint
```

```python
import transcriptformer

model = transcriptformer.load("{base}", adapter="{path}")  # adapters merged into the weights
```
"""

HEAD_MODULES = ("mu", "gene_id_head")

# The keys of adapter_config.json that finetune sets, and those that only record where the adapters come from.
# Every other peft option must keep peft's default: options such as DoRA, rsLoRA, rank or alpha patterns and
# PiSSA-style initialisations change what the adapters compute, or rewrite the base weights when loaded.
ADAPTER_SETTINGS = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")
ADAPTER_RECORDS = ("peft_type", "base_model_name_or_path", "peft_version", "auto_mapping", "inference_mode")
ADAPTER_RECORDS += ("revision", "task_type", "runtime_config")
ADAPTER_FIX = "give `adapter` a folder that 'transcriptformer finetune' saved for this checkpoint"
# The names of rank, alpha and dropout: flags of finetune, keys of adapter_config.json.
LORA_NUMBERS = ("lora_r", "lora_alpha", "lora_dropout")
# The prefix of the module names in peft's saved weights.
SAVED_PREFIX = "base_model.model."

# Friendly names of the linear layers LoRA can adapt, as suffixes of module names (peft's matching rule).
TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "attention": ("self_attn.linears.0", "self_attn.linears.1", "self_attn.linears.2", "self_attn.linears.3"),
    "ffn": ("linear1", "linear2"),
    "q": ("self_attn.linears.0",),
    "k": ("self_attn.linears.1",),
    "v": ("self_attn.linears.2",),
    "o": ("self_attn.linears.3",),
    "ffn1": ("linear1",),
    "ffn2": ("linear2",),
}


@dataclass
class LoraConfig:
    """LoRA adapters (through ``peft``).

    Attributes
    ----------
    r : int
        Adapter rank.
    alpha : float
        Scaling numerator: the update is ``alpha / r * B A``.
    dropout : float
        Dropout on the adapter input.
    target_modules : list of str
        ``attention`` (Q, K, V, output projections), ``ffn`` (both FFN linears), ``q``, ``k``, ``v``, ``o``,
        ``ffn1``, ``ffn2``, or module names of the model (e.g. ``linears.0``).
    train_heads : bool
        Also train full copies of the count head and gene-id head.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["attention", "ffn"])
    train_heads: bool = False

    def __post_init__(self) -> None:
        check_lora_numbers(self.r, self.alpha, self.dropout)


def check_lora_numbers(r: Any, alpha: Any, dropout: Any, names: tuple[str, str, str] = LORA_NUMBERS) -> None:
    """Raise a ``ValueError`` naming the setting (by ``names``: rank, alpha, dropout) that is out of its range."""
    if not isinstance(r, int) or isinstance(r, bool):
        raise ValueError(f"{names[0]} must be a whole number >= 1, got {r!r:.40}")
    check_number(r, names[0], at_least=1)
    check_number(alpha, names[1], above=0, also="the update is alpha / r * B A")
    check_number(dropout, names[2], at_least=0, below=1)


def resolve_target_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Expand aliases (see :data:`TARGET_ALIASES`) and check that every target names a linear layer.

    Raises
    ------
    ValueError
        When a name matches no ``nn.Linear`` of ``model``.
    """
    from torch import nn

    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    targets: list[str] = []
    for name in names:
        for target in TARGET_ALIASES.get(name, (name,)):
            if not any(n == target or n.endswith("." + target) for n in linear_names):
                raise ValueError(
                    f"LoRA target {target!r} matches no linear layer of the model; use one of "
                    f"{sorted(TARGET_ALIASES)} or a module name such as {linear_names[0]!r}"
                )
            if target not in targets:
                targets.append(target)
    if not targets:
        raise ValueError("no LoRA target module given")
    return targets


def add_lora_adapters(model: TranscriptFormer, settings: LoraConfig, base_checkpoint: str | None = None) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; every base weight is frozen.

    The adapters start as an exact identity (``B = 0``), so the wrapped model computes what ``model`` does.

    Parameters
    ----------
    model
        The base model; its modules are modified in place.
    settings
        Rank, alpha, dropout, target modules and whether the heads are trained too.
    base_checkpoint
        Path of the base checkpoint, recorded in ``adapter_config.json``.
    """
    import peft

    model.name_or_path = base_checkpoint  # the Hugging Face attribute that peft records in adapter_config.json
    heads = [name for name in HEAD_MODULES if getattr(model, name, None) is not None] if settings.train_heads else []
    config = peft.LoraConfig(  # peft's settings, built from ours
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=resolve_target_modules(model, settings.target_modules),
        modules_to_save=heads or None,
    )
    return peft.get_peft_model(model, config)


def save_adapters(
    model: PeftModel, path: str | Path, overwrite: bool = False, base_weights_sha256: str | None = None
) -> Path:
    """Write the adapter weights (safetensors), their config and a model card to the directory ``path``.

    The files get the permissions of any new file of the user (``0o666`` less the umask). ``base_weights_sha256``,
    the SHA-256 of the base checkpoint's weights file, is recorded in the weights file's metadata, so that loading
    the adapters onto another checkpoint of the same shape is refused.

    Raises
    ------
    FileExistsError
        When ``path`` is a file, or already holds adapters and ``overwrite`` is False.
    """
    path = Path(path)
    if path.is_file():
        raise FileExistsError(f"{path} is a file; adapters are saved as a directory")
    if (path / ADAPTER_WEIGHTS_FILE).exists() and not overwrite:
        raise FileExistsError(
            f"{path} already holds adapters; choose another output path, or pass `overwrite=True` to replace them"
        )
    model.save_pretrained(path, safe_serialization=True)
    if base_weights_sha256 is not None:
        record_base_weights(path / ADAPTER_WEIGHTS_FILE, base_weights_sha256)
    (path / MODEL_CARD_FILE).write_text(model_card(model, path))  # replaces peft's empty template
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MODEL_CARD_FILE):
        (path / name).chmod(new_file_mode())  # safetensors writes its file owner-only (0600)
    return path


def record_base_weights(weights_file: Path, base_weights_sha256: str) -> None:
    """Add the base checkpoint's weights SHA-256 to the metadata of the adapter weights file ``weights_file``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(weights_file, "pt") as file:
        metadata = file.metadata() or {}
    save_file(load_file(weights_file), weights_file, metadata=metadata | {BASE_WEIGHTS_KEY: base_weights_sha256})


def check_base_weights(folder: Path, base_weights: Path) -> None:
    """Refuse adapters whose recorded base checkpoint is not the one whose weights file is ``base_weights``.

    Adapters saved without the record (by older versions) load with a warning.

    Raises
    ------
    UserError
        When the SHA-256 recorded in the adapter weights' metadata differs from ``base_weights``'.
    """
    from safetensors import safe_open

    with safe_open(folder / ADAPTER_WEIGHTS_FILE, "pt") as file:
        recorded = (file.metadata() or {}).get(BASE_WEIGHTS_KEY)
    if recorded is None:
        warnings.warn(
            f"the adapters in {folder} do not record the checkpoint they were trained on (saved by an older "
            f"version); make sure it is {base_weights.parent}, else their outputs are wrong",
            stacklevel=3,
        )
        return
    actual = sha256_of(base_weights)
    if recorded != actual:
        trained_on = json.loads((folder / ADAPTER_CONFIG_FILE).read_text()).get("base_model_name_or_path")
        raise UserError(
            f"the adapters in {folder} were trained on the checkpoint {trained_on} (weights SHA-256 {recorded[:12]}), "
            f"not on {base_weights.parent} (SHA-256 {actual[:12]}): give checkpoint_path the checkpoint they were "
            "trained on"
        )


def model_card(model: PeftModel, path: Path) -> str:
    """The ``README.md`` of adapters saved to ``path``: base checkpoint, LoRA settings, how to load them."""
    from importlib.metadata import version

    from transcriptformer.version import __version__

    config = model.peft_config[model.active_adapter]
    return MODEL_CARD.format(
        version=__version__,
        peft_version=version("peft"),
        base=config.base_model_name_or_path or "BASE_CHECKPOINT",
        path=path,
        r=config.r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        targets=", ".join(f"`{name}`" for name in sorted(config.target_modules)),
        heads=", ".join(f"`{name}`" for name in config.modules_to_save or ()) or "none",
    )


def new_file_mode() -> int:
    """The permissions of any new file of the user: ``0o666`` less the process' umask (reading it means setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def load_adapters(
    model: TranscriptFormer,
    path: str | Path,
    merge: bool = True,
    trainable: bool = False,
    base_weights: str | Path | None = None,
) -> TranscriptFormer | PeftModel:
    """Apply saved adapters to a loaded base model.

    Parameters
    ----------
    model
        The base model the adapters were trained on (its modules are modified in place).
    path
        Adapter directory written by :func:`save_adapters`.
    merge
        Fold the adapters into the base weights and return a plain :class:`TranscriptFormer` (no extra cost at
        inference); otherwise return the ``peft`` model with separate adapters.
    trainable
        Keep the adapters trainable (only with ``merge=False``).
    base_weights
        The weights file of the checkpoint ``model`` was loaded from: checked against the base checkpoint the
        adapters record (see :func:`check_base_weights`).

    Raises
    ------
    FileNotFoundError
        When ``path`` holds no adapters.
    UserError
        Before the base weights change, when ``adapter_config.json`` is not plain LoRA as ``finetune`` writes it
        (see :func:`read_adapter_config`), the weights are not finite or do not fit ``model`` (another model,
        width or rank), or they were trained on another base checkpoint than ``base_weights``; after merging, when
        a merged weight is not finite.
    """
    path = Path(path)
    missing = [name for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not an adapter directory: {', '.join(missing)} missing")
    if merge and trainable:
        raise ValueError("merged adapters cannot stay trainable; pass merge=False to keep training them")
    check_safetensors(path / ADAPTER_WEIGHTS_FILE, what="the adapter weights", fix=ADAPTER_FIX)
    config = read_adapter_config(path / ADAPTER_CONFIG_FILE)
    check_adapter_weights(path / ADAPTER_WEIGHTS_FILE, config, model)
    if base_weights is not None:
        check_base_weights(path, Path(base_weights))
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, path, is_trainable=trainable)
    return merge_adapters(peft_model) if merge else peft_model


def read_adapter_config(file: Path) -> dict[str, Any]:
    """``adapter_config.json``, refused unless it describes LoRA adapters as ``finetune`` writes them.

    Raises
    ------
    UserError
        For a file that is not a JSON object, another peft type than LoRA, an option ``finetune`` does not write
        (PiSSA-style initialisations rewrite the base weights at load), or a rank, alpha, dropout or target list
        out of range.
    """
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{file} is not JSON ({error}); {ADAPTER_FIX}") from None
    if not isinstance(config, dict):
        raise UserError(f"{file} must hold a JSON object of peft settings; {ADAPTER_FIX}")
    if config.get("peft_type") != "LORA":
        raise UserError(
            f"{file}: peft_type {config.get('peft_type')!r} is not supported: only LoRA adapters (peft_type LORA, "
            f"as 'transcriptformer finetune' saves them) can be loaded; {ADAPTER_FIX}"
        )
    init = config.get("init_lora_weights", True)
    if init is not True:
        raise UserError(
            f"{file}: init_lora_weights {init!r} is not supported: initialisations such as pissa, olora, loftq, eva "
            "or corda rewrite the base weights when the adapters are loaded; adapters of 'transcriptformer "
            "finetune' have init_lora_weights true"
        )
    changed = sorted(key for key, value in config.items() if _changes_lora(key, value))
    if changed:
        shown = ", ".join(f"{key}={config[key]!r:.40}" for key in changed[:4])
        raise UserError(
            f"{file} sets peft options that 'transcriptformer finetune' does not use ({shown}); they change what the "
            f"adapters compute: remove them (plain LoRA: r, lora_alpha, lora_dropout, target_modules), or "
            f"{ADAPTER_FIX}"
        )
    try:
        numbers = config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0)
        check_lora_numbers(*numbers, names=("r", "lora_alpha", "lora_dropout"))
    except ValueError as error:
        raise UserError(f"{file}: {error}; {ADAPTER_FIX}") from None
    targets, heads = config.get("target_modules"), config.get("modules_to_save") or []
    for key, value in (("target_modules", targets), ("modules_to_save", heads)):
        if not isinstance(value, list) or not all(isinstance(name, str) and name for name in value):
            raise UserError(
                f"{file}: {key} must be a list of module names, got {value!r:.60} (a regular expression is not "
                f"supported); {ADAPTER_FIX}"
            )
    if not targets:
        raise UserError(f"{file}: target_modules is empty, so the adapters change nothing; {ADAPTER_FIX}")
    return config


def _changes_lora(key: str, value: Any) -> bool:
    """Whether the peft option ``key`` of ``adapter_config.json`` differs from plain LoRA."""
    import peft

    if key in ADAPTER_SETTINGS or key in ADAPTER_RECORDS or key == "init_lora_weights":
        return False
    defaults = {item.name: item for item in dataclasses.fields(peft.LoraConfig)}
    if key in defaults:
        item = defaults[key]
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        if value == default and type(value) is type(default):
            return False
    return not (value is None or value is False or value == {} or value == [])  # an option this peft lacks: off


def check_adapter_weights(weights_file: Path, config: Mapping[str, Any], model: nn.Module) -> None:
    """Check that the adapter weights are finite and fit ``model``: each targeted layer, its rank, the heads.

    Raises
    ------
    UserError
        When a tensor holds NaN or infinite values (a diverged run), the weights have another rank than
        ``adapter_config.json``, or they belong to another model (layers it lacks, or of another width).
    """
    import torch
    from safetensors.torch import load_file

    tensors = load_file(weights_file)
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise UserError(
            f"{weights_file}: {len(bad)} adapter tensor(s) hold NaN or infinite values (first: {bad[0]}); they come "
            "from a diverged run: train them again with a lower learning rate and gradient clipping on "
            "('transcriptformer finetune --lr, --gradient-clip')"
        )
    expected = expected_adapter_shapes(model, config, weights_file.parent / ADAPTER_CONFIG_FILE)
    _check_rank(tensors, config["r"], weights_file)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [key for key in expected if key in tensors and tuple(tensors[key].shape) != expected[key]]
    if unexpected or wrong:
        key = (unexpected or wrong)[0]
        detail = f"shape {tuple(tensors[key].shape)} where the model needs {expected[key]}" if not unexpected else ""
        detail = detail or "a layer this model does not have"
        raise UserError(
            f"{weights_file} does not fit the checkpoint ({len(unexpected) + len(wrong)} tensor(s), first: {key}: "
            f"{detail}): the adapters were trained on another model; {ADAPTER_FIX}"
        )
    if missing:
        raise UserError(
            f"{weights_file} lacks {len(missing)} of the {len(expected)} tensors that adapter_config.json asks for "
            f"(first: {missing[0]}): the file is incomplete or belongs to another config; {ADAPTER_FIX}"
        )


def expected_adapter_shapes(model: nn.Module, config: Mapping[str, Any], config_file: Path) -> dict[str, tuple]:
    """The saved name and shape of every tensor that adapters of ``config`` have on ``model``."""
    from torch import nn

    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    targets = config["target_modules"]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in linears):
            raise UserError(
                f"{config_file}: target_modules names {target!r}, which matches no linear layer of this model: the "
                f"adapters were trained on another model; {ADAPTER_FIX}"
            )
    r, shapes = config["r"], {}
    for name, module in linears.items():
        if any(name == t or name.endswith("." + t) for t in targets):
            shapes[f"{SAVED_PREFIX}{name}.lora_A.weight"] = (r, module.in_features)
            shapes[f"{SAVED_PREFIX}{name}.lora_B.weight"] = (module.out_features, r)
    for head in config.get("modules_to_save") or []:
        if head not in HEAD_MODULES or getattr(model, head, None) is None:
            present = [name for name in HEAD_MODULES if getattr(model, name, None) is not None]
            raise UserError(
                f"{config_file}: modules_to_save names {head!r}, not a head of this model ({present}); {ADAPTER_FIX}"
            )
        for name, parameter in getattr(model, head).named_parameters():
            shapes[f"{SAVED_PREFIX}{head}.{name}"] = tuple(parameter.shape)
    return shapes


def _check_rank(tensors: Mapping[str, torch.Tensor], r: int, weights_file: Path) -> None:
    """Refuse LoRA weights whose rank is not ``adapter_config.json``'s ``r``."""
    ranks = {int(value.shape[0]) for key, value in tensors.items() if key.endswith("lora_A.weight") and value.ndim}
    if ranks and ranks != {r}:
        raise UserError(
            f"{weights_file} holds adapters of rank {sorted(ranks)}, but adapter_config.json says r={r}: the config "
            f"was edited or belongs to other weights; {ADAPTER_FIX}"
        )


def merge_adapters(model: PeftModel) -> TranscriptFormer:
    """Fold the adapters (and trained heads) into the base weights; returns the plain base model.

    Raises
    ------
    UserError
        When a merged weight is NaN or infinite (finite adapters can overflow once scaled by ``alpha / r``).
    """
    import torch

    merged = model.merge_and_unload()
    bad = [
        key
        for key, value in merged.state_dict().items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if bad:
        raise UserError(
            f"merging the adapters gives NaN or infinite weights in {len(bad)} tensor(s) (first: {bad[0]}): their "
            "update (lora_alpha / r * B A) overflows; check lora_alpha in adapter_config.json, or train them again"
        )
    return merged


def base_model(model: nn.Module) -> TranscriptFormer:
    """The :class:`TranscriptFormer` inside a ``peft`` model (with its adapter layers), or ``model`` itself."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model
