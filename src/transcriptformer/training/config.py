"""Typed settings of training and fine-tuning, and their Hydra composition.

``transcriptformer train`` reads a YAML file of ``conf/`` (model size, data, optimisation) whose keys map onto
:class:`TrainConfig`; command-line overrides use Hydra's grammar (``optim.lr=1e-3``,
``data.train_files=[a.h5ad,b.h5ad]``). ``transcriptformer finetune`` fills :class:`FinetuneConfig` from its flags.
The model architecture reuses :class:`~transcriptformer.config.ModelConfig`, the tokenization
:class:`~transcriptformer.config.DataConfig`: the checkpoint written at the end carries both unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transcriptformer.config import DataConfig, LossConfig, ModelConfig, check_number, check_range, check_types
from transcriptformer.model.lora import LoraConfig
from transcriptformer.runtime import BACKENDS, PRECISIONS

SCHEMA_NAME = "train_schema"
# What ``transcriptformer finetune`` trains for: the generative objective of pretraining, or a cell classifier.
TASKS = ("generative", "classify")
# Weights of the classes in the classification loss: inversely proportional to their share of cells, or equal.
CLASS_WEIGHTS = ("balanced", "none")
# The seeds numpy (and so Lightning's seed_everything) accepts: 0 to 2**32 - 1.
SEED_LIMIT = 2**32
# Former names of settings, which overrides of ``transcriptformer train`` may still use: former -> current key.
FORMER_KEYS = {
    "output_dir": "output_path",
    "data.num_workers": "data.n_data_workers",
    "trainer.devices": "trainer.device",
}


@dataclass
class TrainDataConfig:
    """Which cells to train on and how to batch them.

    Attributes
    ----------
    train_files : list of str
        ``.h5ad`` files of training cells.
    val_files : list of str
        ``.h5ad`` files of validation cells; when empty, ``val_fraction`` of the training cells is held out.
    val_fraction : float
        Share of each training file held out for validation (seeded) when no ``val_files`` are given.
    gene_col_name : str or None
        ``var`` column with gene ids; the checkpoint's when ``None``.
    invalid_counts : str or None
        What to do with NaN, infinite or negative counts (see :class:`~transcriptformer.config.DataConfig`);
        ``data_config``'s when ``None``.
    use_raw : bool or None
        Count matrix: ``adata.raw`` when present (``None``), forced (``True``) or ``adata.X`` (``False``).
    batch_size : int
        Cells per batch (per device).
    n_data_workers : int
        Data-loader worker processes.
    """

    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    val_fraction: float = 0.0
    gene_col_name: str | None = None
    invalid_counts: str | None = None
    use_raw: bool | None = None
    batch_size: int = 8
    n_data_workers: int = 0

    def __post_init__(self) -> None:
        check_types(self, "data")
        check_range(self, "data", "val_fraction", at_least=0, below=1)
        check_range(self, "data", "batch_size", at_least=1)
        check_range(self, "data", "n_data_workers", at_least=0)


def require_training_files(data: TrainDataConfig) -> None:
    """Fail early, with a clear message, when no training file is given."""
    if not data.train_files:
        raise ValueError("no training file given (data.train_files / train_files)")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay.

    Attributes
    ----------
    lr : float
        Peak learning rate.
    weight_decay : float
        AdamW weight decay (not applied to biases, norms and embeddings).
    betas : list of float
        AdamW betas.
    warmup_steps : int
        Optimizer steps of linear warm-up from 0 to ``lr``.
    min_lr_ratio : float
        Learning rate at the end of the cosine decay, as a fraction of ``lr``.
    """

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        check_types(self, "optim")
        check_range(self, "optim", "lr", above=0)
        check_range(self, "optim", "weight_decay", at_least=0, also="0: off")
        check_range(self, "optim", "warmup_steps", at_least=0)
        check_range(self, "optim", "min_lr_ratio", at_least=0, at_most=1, also="1: no decay")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers >= 0 and < 1, got {self.betas}")
        for index, beta in enumerate(self.betas):
            check_number(beta, f"optim.betas[{index}]", at_least=0, below=1)


@dataclass
class TrainerConfig:
    """How Lightning runs: device, precision, length, logging, checkpoints.

    Attributes
    ----------
    device : str
        ``"cpu"`` or ``"0"``: CPU (``"cpu:N"``: N CPU processes); ``"N"``: N GPUs (DDP when N > 1); ``"cuda"``:
        every GPU; ``"mps"``: Apple's GPU; ``"auto"``: every GPU, else CPU.
    num_nodes : int
        Machines taking part (Lightning's multi-node DDP).
    precision : str
        ``"32"``, ``"16-mixed"`` (GPU) or ``"bf16-mixed"``.
    max_epochs : int
        Passes over the training cells.
    max_steps : int
        Optimizer steps at most; ``-1`` for no limit.
    accumulate_grad_batches : int
        Batches per optimizer step.
    gradient_clip_val : float
        Gradient-norm clipping threshold; 0 disables clipping.
    log_every_n_steps : int
        Logging interval in optimizer steps.
    checkpoint_every_n_steps : int
        Save a resumable checkpoint every N optimizer steps; 0 saves at each epoch end.
    keep_checkpoints : int
        Checkpoints kept: the best by the validation metric (the loss; the macro F1 when classifying) when there
        is validation, else the latest; -1 keeps all.
    early_stopping_patience : int
        Stop after this many validations without improvement of the validation metric; 0 disables.
    seed : int
        Seed of the initialisation, the data order, the validation split and dropout.
    run_dir : str or None
        Where Lightning writes ``metrics.csv`` and ``checkpoints/``; ``<output>/training_run`` when ``None``.
    resume : str or None
        A Lightning checkpoint to resume from, or ``"last"`` for the latest one in ``run_dir``.
    attention_backend : str
        One of :data:`~transcriptformer.runtime.BACKENDS`: ``"auto"`` (compiled flex attention on CUDA, chunked
        elsewhere), ``"flex"``, ``"chunked"`` or ``"dense"``.
    """

    device: str = "auto"
    num_nodes: int = 1
    precision: str = "32"
    max_epochs: int = 1
    max_steps: int = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 0
    keep_checkpoints: int = 1
    early_stopping_patience: int = 0
    seed: int = 0
    run_dir: str | None = None
    resume: str | None = None
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        self.device = str(self.device)
        self.precision = str(self.precision)
        check_types(self, "trainer")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")
        for name in ("num_nodes", "max_epochs", "accumulate_grad_batches", "log_every_n_steps"):
            check_range(self, "trainer", name, at_least=1)
        check_range(self, "trainer", "max_steps", at_least=1, off=-1, also="-1: no limit")
        check_range(self, "trainer", "gradient_clip_val", at_least=0, also="0: off")
        check_range(self, "trainer", "checkpoint_every_n_steps", at_least=0, also="0: each epoch")
        check_range(self, "trainer", "keep_checkpoints", at_least=-1, also="-1: all")
        check_range(self, "trainer", "early_stopping_patience", at_least=0, also="0: off")
        check_range(self, "trainer", "seed", at_least=0, below=SEED_LIMIT)


@dataclass
class TrainConfig:
    """Pretraining from scratch (``transcriptformer train``).

    Attributes
    ----------
    output_path : str
        Checkpoint directory written at the end, in the published layout (``output_dir``, its former name, still
        works as an override).
    model_config : ModelConfig
        Architecture, stored as the checkpoint's ``model_config``.
    loss_config : LossConfig
        Objective weights, stored as the checkpoint's ``loss_config``.
    data_config : DataConfig
        Tokenization, stored as the checkpoint's ``data_config``; ``esm2_mappings`` lists the paths of the
        gene-embedding ``.h5`` files (copied into ``vocabs/``), ``aux_cols`` the ``obs`` columns whose values
        become aux tokens (their vocabularies are read from the training files).
    data, optim, trainer
        See :class:`TrainDataConfig`, :class:`OptimConfig`, :class:`TrainerConfig`.
    """

    output_path: str = "checkpoints/transcriptformer"
    model_config: ModelConfig = field(default_factory=ModelConfig)
    loss_config: LossConfig = field(default_factory=LossConfig)
    data_config: DataConfig = field(default_factory=DataConfig)
    data: TrainDataConfig = field(default_factory=lambda: TrainDataConfig(val_fraction=0.1))
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class ClassifyConfig:
    """Supervised fine-tuning for cell classification (``finetune --task classify``).

    Attributes
    ----------
    label_key : str or None
        ``obs`` column of the training (and validation) files that holds each cell's class, e.g. ``cell_type``.
    class_weights : str
        ``"balanced"``: each class's cross-entropy weighted by ``n_cells / (n_classes * n_cells_of_class)`` (the
        training split's), so that rare classes count as much as common ones; ``"none"``: equal weights.
    min_cells_per_class : int
        Classes with fewer cells in the training files are left out (their cells with them), with a warning.
    head_hidden_dim : int
        Hidden width of the classification head (a two-layer MLP with GELU); 0: a linear layer. The head reads
        the layer-normalised cell embedding.
    """

    label_key: str | None = None
    class_weights: str = "balanced"
    min_cells_per_class: int = 10
    head_hidden_dim: int = 0

    def __post_init__(self) -> None:
        check_types(self, "classify")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"class_weights must be one of {CLASS_WEIGHTS}, got {self.class_weights!r}")
        check_range(self, "classify", "min_cells_per_class", at_least=2)
        check_range(self, "classify", "head_hidden_dim", at_least=0, also="0: a linear head")


# The projection of the frozen gene-embedding table into the model (two linear layers), adapted by the classify task.
GENE_PROJECTION = ["gene_embeddings.mlp.layers.0", "gene_embeddings.mlp.layers.4"]
# The settings whose default differs for the classify task, by section of FinetuneConfig: the recipe that
# benchmarks/classify_demo.py measures on the bundled cells (docs/training.md). 15% of the cells validate, to keep the
# best validation macro F1 and stop 8 epochs after it. Every other setting, and every setting of the generative
# task, keeps its dataclass default.
CLASSIFY_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"val_fraction": 0.15, "batch_size": 16},
    "optim": {"lr": 3e-3, "warmup_steps": 20},
    "trainer": {"max_epochs": 40, "early_stopping_patience": 8},
    "lora": {"target_modules": [*LoraConfig().target_modules, *GENE_PROJECTION]},
}
TASK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {"generative": {}, "classify": CLASSIFY_DEFAULTS}
SECTIONS = {"data": TrainDataConfig, "optim": OptimConfig, "trainer": TrainerConfig, "lora": LoraConfig}


def task_section(task: str, section: str, **given: Any) -> Any:
    """The ``section`` settings of fine-tuning for ``task``: the task's defaults, then the ``given`` values not None.

    Parameters
    ----------
    task
        One of :data:`TASKS`.
    section
        ``data``, ``optim``, ``trainer`` or ``lora`` (see :data:`SECTIONS`).
    given
        Settings of the section; ``None`` takes the task's default.
    """
    chosen = {name: value for name, value in given.items() if value is not None}
    return SECTIONS[section](**(TASK_DEFAULTS[task].get(section, {}) | chosen))


def task_default(task: str, section: str, name: str) -> Any:
    """The default of the setting ``section.name`` for ``task``."""
    return getattr(task_section(task, section), name)


@dataclass
class FinetuneConfig:
    """LoRA fine-tuning of a checkpoint (``transcriptformer finetune``).

    Attributes
    ----------
    checkpoint_path : str
        Base checkpoint directory.
    output_path : str
        Adapter directory written at the end (``adapter_config.json`` + ``adapter_model.safetensors``; with
        ``task="classify"`` also the classification head and its classes).
    task : str
        One of :data:`TASKS`: ``"generative"`` trains on the pretraining objective (counts and gene ids of the
        cells); ``"classify"`` trains the adapters and a classification head on the cell embedding to predict
        ``classify.label_key``.
    data, optim, trainer, lora, classify
        See :class:`TrainDataConfig`, :class:`OptimConfig`, :class:`TrainerConfig`, :class:`LoraConfig`,
        :class:`ClassifyConfig`. A section left out (``None``) takes the task's defaults (:func:`task_section`:
        for ``classify``, :data:`CLASSIFY_DEFAULTS`).
    """

    checkpoint_path: str
    output_path: str
    task: str = "generative"
    data: TrainDataConfig | None = None
    optim: OptimConfig | None = None
    trainer: TrainerConfig | None = None
    lora: LoraConfig | None = None
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        for section in SECTIONS:
            if getattr(self, section) is None:
                setattr(self, section, task_section(self.task, section))
        has_labels = self.classify.label_key is not None
        if self.task == "classify" and not has_labels:
            raise ValueError("the classify task needs label_key: the obs column that holds each cell's class")
        if self.task != "classify" and has_labels:
            raise ValueError("label_key is for the classify task; pass `task='classify'` to train a classifier")
        if self.task == "classify" and self.lora.train_heads:
            raise ValueError("train_heads trains the count and gene-id heads, which the classify task does not use")
        check_range(self.lora, "lora", "alpha", above=0)  # LoraConfig checks the rank and the dropout


def compose_train_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Compose a Hydra YAML config and command-line overrides into a validated :class:`TrainConfig`.

    The typed schema is registered with Hydra as ``train_schema``; a YAML file lists it first in its defaults
    list (``defaults: [train_schema, model_config: tiny, _self_]``) so that every field can be overridden.

    Parameters
    ----------
    config_file
        A YAML file, e.g. ``conf/demo.yaml``; its folder is the Hydra config directory, so its defaults list
        may name groups such as ``model_config: tiny``. Without a file, the dataclass defaults apply.
    overrides
        Hydra overrides, e.g. ``["optim.lr=1e-3", "trainer.max_epochs=5"]``; a key's former name
        (:data:`FORMER_KEYS`, e.g. ``output_dir=``) sets the setting of its current name.

    Raises
    ------
    ValueError
        When an override does not apply or a value does not fit the type of its field (the message says which).
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return _compose(config_file, [with_current_key(override) for override in overrides or []])
    except (HydraException, OmegaConfBaseException) as error:
        lines = str(error).strip().splitlines()
        message = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]  # what and why
        cause = str(error.__cause__).strip().splitlines()[0] if error.__cause__ is not None else ""
        message = message if cause in message else f"{message}: {cause}"
        renamed = [f"{old} is now {new}" for old, new in FORMER_KEYS.items() if f"'{old.split('.')[-1]}'" in message]
        raise ValueError("; ".join([message, *renamed])) from None


def with_current_key(override: str) -> str:
    """A Hydra override with the current name of its key: ``output_dir=out`` -> ``output_path=out``."""
    prefix = override[: len(override) - len(override.lstrip("+~"))]
    key, equals, value = override[len(prefix) :].partition("=")
    return f"{prefix}{FORMER_KEYS.get(key, key)}{equals}{value}"


def _compose(config_file: str | Path | None, overrides: list[str] | None) -> TrainConfig:
    from hydra import compose, initialize, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
    if config_file is None:
        with initialize(config_path=None, version_base=None):
            composed = compose(config_name=SCHEMA_NAME, overrides=list(overrides or []))
    else:
        config_file = Path(config_file).resolve()
        if not config_file.is_file():
            raise FileNotFoundError(f"no such config file: {config_file}")
        with initialize_config_dir(config_dir=str(config_file.parent), version_base=None):
            composed = compose(config_name=config_file.stem, overrides=list(overrides or []))
    if OmegaConf.get_type(composed) is not TrainConfig:  # a file without train_schema in its defaults
        composed = OmegaConf.merge(OmegaConf.structured(TrainConfig), composed)
    return OmegaConf.to_object(composed)
