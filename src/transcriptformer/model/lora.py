"""LoRA adapters for TranscriptFormer through ``peft``: wrap, save, load, merge.

Adapters are saved alone in the ``peft`` layout, which Hugging Face users know::

    <adapter>/adapter_config.json        rank, alpha, dropout, target modules, base checkpoint path
    <adapter>/adapter_model.safetensors  the adapter (and trained head) weights only
    <adapter>/README.md                  what they are: base checkpoint, LoRA settings, how to load them

>>> from transcriptformer.checkpoint import load_checkpoint
>>> checkpoint = load_checkpoint("checkpoints/tf_sapiens", adapter="adapters/my_cells")  # merged weights

``peft`` (and with it torch) is imported when adapters are first used, so that :class:`LoraSettings` can be read
without it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from transcriptformer.errors import UserError
from transcriptformer.safe_load import check_safetensors

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn

    from transcriptformer.model.transcriptformer import TranscriptFormer

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MODEL_CARD_FILE = "README.md"

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
class LoraSettings:
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
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


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


def add_lora_adapters(model: TranscriptFormer, settings: LoraSettings, base_checkpoint: str | None = None) -> PeftModel:
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
    from peft import LoraConfig, get_peft_model

    model.name_or_path = base_checkpoint  # the Hugging Face attribute that peft records in adapter_config.json
    heads = [name for name in HEAD_MODULES if getattr(model, name, None) is not None] if settings.train_heads else []
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=resolve_target_modules(model, settings.target_modules),
        modules_to_save=heads or None,
    )
    return get_peft_model(model, config)


def save_adapters(model: PeftModel, path: str | Path, overwrite: bool = False) -> Path:
    """Write the adapter weights (safetensors), their config and a model card to the directory ``path``.

    The files get the permissions of any new file of the user (``0o666`` less the umask).

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
            f"{path} already holds adapters; choose another output path, or pass --overwrite to replace them"
        )
    model.save_pretrained(path, safe_serialization=True)
    (path / MODEL_CARD_FILE).write_text(model_card(model, path))  # replaces peft's empty template
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MODEL_CARD_FILE):
        (path / name).chmod(new_file_mode())  # safetensors writes its file owner-only (0600)
    return path


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
    model: TranscriptFormer, path: str | Path, merge: bool = True, trainable: bool = False
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

    Raises
    ------
    FileNotFoundError
        When ``path`` holds no adapters.
    UserError
        When the adapter weights hold NaN or infinite values.
    """
    path = Path(path)
    missing = [name for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not an adapter directory: {', '.join(missing)} missing")
    if merge and trainable:
        raise ValueError("merged adapters cannot stay trainable; pass merge=False to keep training them")
    fix = "give --adapter a folder that 'transcriptformer finetune' saved"
    check_safetensors(path / ADAPTER_WEIGHTS_FILE, what="the adapter weights", fix=fix)
    check_finite_adapters(path / ADAPTER_WEIGHTS_FILE)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, path, is_trainable=trainable)
    return merge_adapters(peft_model) if merge else peft_model


def check_finite_adapters(weights_file: Path) -> None:
    """Refuse adapter weights that hold NaN or infinite values (a diverged run), naming the first tensor."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(weights_file)
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise UserError(
            f"{weights_file}: {len(bad)} adapter tensor(s) hold NaN or infinite values (first: {bad[0]}); they come "
            "from a diverged run: train them again with a lower --lr (and --gradient-clip on)"
        )


def merge_adapters(model: PeftModel) -> TranscriptFormer:
    """Fold the adapters (and trained heads) into the base weights; returns the plain base model."""
    return model.merge_and_unload()


def base_model(model: nn.Module) -> TranscriptFormer:
    """The :class:`TranscriptFormer` inside a ``peft`` model (with its adapter layers), or ``model`` itself."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model
