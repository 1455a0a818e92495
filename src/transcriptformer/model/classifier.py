"""A cell classifier: a head on the cell embedding, saved beside the LoRA adapters it was trained with.

``transcriptformer finetune --task classify`` writes, next to the adapters (see :mod:`transcriptformer.model.lora`)::

    <adapter>/classifier_head.safetensors  the head's weights; its metadata repeats the label key and classes
    <adapter>/classifier.json              label key, classes (in the order of the head's outputs), head size,
                                           and the SHA-256 of the base weights and of the adapter weights

:func:`load_classifier` checks that these belong together before any weight is used: the head file and
``classifier.json`` name the same label key and classes, the adapters are those the head was trained with, and the
base checkpoint is the one they were trained on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transcriptformer.config import CONFIG_FILE, TranscriptFormerConfig, check_number, check_types
from transcriptformer.errors import UserError
from transcriptformer.model.lora import ADAPTER_WEIGHTS_FILE, new_file_mode
from transcriptformer.safe_load import check_safetensors, sha256_of

CLASSIFIER_CONFIG_FILE = "classifier.json"
CLASSIFIER_WEIGHTS_FILE = "classifier_head.safetensors"
FIX = "give a folder that 'transcriptformer finetune --task classify' wrote, with all of its files"
# Classes named in one error message at most.
SHOWN_CLASSES = 8


class ClassifierHead(nn.Module):
    """Class logits of a cell embedding: layer norm, then a linear layer or a two-layer MLP with GELU.

    Parameters
    ----------
    embed_dim
        Width of the cell embedding.
    n_classes
        Number of classes.
    hidden_dim
        Hidden width of the MLP; 0 for a linear layer.
    """

    def __init__(self, embed_dim: int, n_classes: int, hidden_dim: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        if hidden_dim:
            self.layers = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, n_classes))
        else:
            self.layers = nn.Sequential(nn.Linear(embed_dim, n_classes))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, n_classes)`` logits of ``(B, E)`` cell embeddings."""
        return self.layers(self.norm(embeddings))


@dataclass(frozen=True)
class ClassifierInfo:
    """What ``classifier.json`` holds.

    Attributes
    ----------
    label_key : str
        The ``obs`` column the classifier was trained to predict.
    classes : list of str
        Class names, in the order of the head's outputs.
    embed_dim, hidden_dim : int
        Size of the head (see :class:`ClassifierHead`).
    base_checkpoint : str
        The base checkpoint's folder when it was trained (for messages).
    base_weights_sha256, adapter_sha256 : str
        SHA-256 of the base checkpoint's ``model_weights.pt`` and of ``adapter_model.safetensors``.
    """

    label_key: str
    classes: list[str]
    embed_dim: int
    hidden_dim: int
    base_checkpoint: str
    base_weights_sha256: str
    adapter_sha256: str

    def new_head(self) -> ClassifierHead:
        """An untrained head of this size."""
        return ClassifierHead(self.embed_dim, len(self.classes), self.hidden_dim)

    def head_metadata(self) -> dict[str, str]:
        """The safetensors metadata of the head file: label key and classes."""
        return {"label_key": self.label_key, "classes": json.dumps(self.classes)}


@dataclass
class Classifier:
    """A trained head and its classes."""

    info: ClassifierInfo
    head: ClassifierHead

    @torch.no_grad()
    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """``(n_cells, n_classes)`` class probabilities of cell embeddings (NaN rows for NaN embeddings)."""
        self.head.eval()
        logits = self.head(torch.as_tensor(embeddings, dtype=torch.float32))
        return torch.softmax(logits, dim=-1).numpy()


def has_classifier(path: str | Path) -> bool:
    """Whether the adapter folder ``path`` holds a classifier (its ``classifier.json``)."""
    return (Path(path) / CLASSIFIER_CONFIG_FILE).is_file()


def save_classifier(head: ClassifierHead, info: ClassifierInfo, path: str | Path) -> Path:
    """Write the head's weights and ``classifier.json`` into the adapter folder ``path`` (replacing them)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {name: value.detach().cpu().contiguous() for name, value in head.state_dict().items()}
    save_file(tensors, path / CLASSIFIER_WEIGHTS_FILE, metadata=info.head_metadata())
    (path / CLASSIFIER_CONFIG_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n")
    for name in (CLASSIFIER_WEIGHTS_FILE, CLASSIFIER_CONFIG_FILE):
        (path / name).chmod(new_file_mode())  # safetensors writes its file owner-only (0600)
    return path


def read_classifier_info(path: str | Path) -> ClassifierInfo:
    """The ``classifier.json`` of the adapter folder ``path``.

    Raises
    ------
    UserError
        When it is missing, not JSON, lacks a field, or a field has the wrong type or is out of range (see
        :func:`check_classifier_info`).
    """
    file = Path(path) / CLASSIFIER_CONFIG_FILE
    if not file.is_file():
        raise UserError(f"{path} holds no classifier ({CLASSIFIER_CONFIG_FILE} is missing): {FIX}")
    try:
        info = ClassifierInfo(**json.loads(file.read_text()))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as error:
        raise UserError(f"{file} is not a classifier description ({error}); {FIX}") from None
    try:
        check_classifier_info(info)
    except ValueError as error:
        raise UserError(f"{file}: {error}; {FIX}") from None
    return info


def check_classifier_info(info: ClassifierInfo) -> None:
    """Raise a ``ValueError`` naming the field of ``classifier.json`` that is of the wrong type or out of range.

    The label key is a non-empty string without ``/`` (it names ``obs`` and ``obsm`` entries), the classes are two
    or more distinct strings, ``embed_dim`` is at least 1 and ``hidden_dim`` at least 0 (0: a linear head).
    """
    check_types(info, "")
    if not info.label_key or "/" in info.label_key:
        raise ValueError(f"label_key must be a non-empty name without '/', got {info.label_key!r:.60}")
    if len(info.classes) < 2:
        raise ValueError(f"classes must name at least 2 classes, got {short_list(info.classes)}")
    repeated = sorted({name for name in info.classes if info.classes.count(name) > 1})
    if repeated:
        raise ValueError(f"classes names {short_list(repeated)} more than once; each output of the head is one class")
    check_number(info.embed_dim, "embed_dim", at_least=1)
    check_number(info.hidden_dim, "hidden_dim", at_least=0, also="0: a linear head")


def short_list(names: list, limit: int = SHOWN_CLASSES) -> str:
    """``names`` for a message: all of them up to ``limit``, else the first ones and how many there are."""
    if len(names) <= limit:
        return repr(list(names))
    shown = ", ".join(repr(name) for name in names[:limit])
    return f"[{shown}, ...] ({len(names)} in all)"


def load_classifier(path: str | Path, base_weights: str | Path) -> Classifier:
    """The classifier of the adapter folder ``path``, after checking that its files belong together.

    Parameters
    ----------
    path
        Adapter folder written by ``transcriptformer finetune --task classify``.
    base_weights
        ``model_weights.pt`` of the base checkpoint the adapters will be applied to.

    Raises
    ------
    UserError
        When a file is missing or unreadable, the head was trained for other classes than ``classifier.json``
        lists, the adapters are not those it was trained with, the base checkpoint is another one (other weights or
        embedding width), or the head's weights do not fit its size or are not finite.
    """
    path = Path(path)
    info = read_classifier_info(path)
    weights = path / CLASSIFIER_WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{path} holds no classifier head ({CLASSIFIER_WEIGHTS_FILE} is missing): {FIX}")
    check_safetensors(weights, what="the classifier head", fix=FIX)
    head_state, metadata = _read_head(weights)
    if metadata != info.head_metadata():
        raise UserError(
            f"{weights} was trained for the labels {_describe(metadata)}, but {CLASSIFIER_CONFIG_FILE} lists "
            f"{_describe(info.head_metadata())}: the two files come from different runs; {FIX}"
        )
    adapters = path / ADAPTER_WEIGHTS_FILE
    if not adapters.is_file() or sha256_of(adapters) != info.adapter_sha256:
        raise UserError(
            f"{adapters} is not the adapter file the classifier head of {path} was trained with (its SHA-256 "
            f"differs from the one in {CLASSIFIER_CONFIG_FILE}); {FIX}"
        )
    if sha256_of(base_weights) != info.base_weights_sha256:
        raise UserError(
            f"the classifier in {path} was trained on the checkpoint {info.base_checkpoint}, not on "
            f"{Path(base_weights).parent} (their weights differ): load it with checkpoint_path "
            f"{info.base_checkpoint}"
        )
    check_embedding_width(info, Path(base_weights).parent)
    with torch.device("meta"):  # shapes only: a hand-edited size allocates nothing before it is checked
        expected = {key: tuple(value.shape) for key, value in info.new_head().state_dict().items()}
    found = {key: tuple(value.shape) for key, value in head_state.items()}
    if found != expected:
        wrong = sorted(key for key in expected.keys() | found.keys() if expected.get(key) != found.get(key))
        raise UserError(
            f"{weights} does not fit {CLASSIFIER_CONFIG_FILE} ({wrong[0]}: {found.get(wrong[0], 'missing')}, "
            f"expected {expected.get(wrong[0], 'no such tensor')}); {FIX}"
        )
    if not all(value.is_floating_point() and torch.isfinite(value).all() for value in head_state.values()):
        raise UserError(
            f"{weights} holds NaN or infinite values: train the classifier again with a lower learning rate "
            "('transcriptformer finetune --task classify --lr')"
        )
    head = info.new_head()
    head.load_state_dict(head_state)
    return Classifier(info, head.eval())


def check_embedding_width(info: ClassifierInfo, checkpoint: Path) -> None:
    """Refuse a head whose input width is not the cell-embedding width of the base checkpoint (its ``config.json``)."""
    try:
        embed_dim = TranscriptFormerConfig.from_json(checkpoint / CONFIG_FILE).model_config.embed_dim
    except (OSError, ValueError):
        return  # the checkpoint's own loading reports it, naming the file
    if info.embed_dim != embed_dim:
        raise UserError(
            f"the classifier head takes cell embeddings of width {info.embed_dim}, but the checkpoint {checkpoint} "
            f"embeds cells in width {embed_dim}: the classifier belongs to another model; {FIX}"
        )


def _read_head(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})


def _describe(metadata: dict[str, str]) -> str:
    try:
        classes = json.loads(metadata.get("classes", "[]"))
    except json.JSONDecodeError:
        classes = metadata.get("classes")
    return (
        f"{short_list(classes) if isinstance(classes, list) else repr(classes)[:80]} of {metadata.get('label_key')!r}"
    )
