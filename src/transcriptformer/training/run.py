"""End-to-end runs behind ``transcriptformer train`` and ``transcriptformer finetune``.

Both load the cells with the model's own tokenizer, train with Lightning and write what inference loads: a
checkpoint directory in the published layout (pretraining) or an adapter directory (LoRA fine-tuning; with
``--task classify`` it also holds the classification head, see :mod:`transcriptformer.model.classifier`). With
``dry_run_only`` they stop after one forward and backward pass and write nothing. A run that fails or is
interrupted writes what it trained to ``<output>/interrupted`` and a resumable ``last.ckpt`` to its run directory
(see :class:`~transcriptformer.training.trainer.KeepWorkOnFailure`).

Adapters and checkpoints are written as one unit: into a temporary folder inside the output first, then moved into
place with ``adapter_config.json`` or ``config.json`` (what makes the folder loadable) last, so that a run killed while
saving leaves nothing that loads. A run replaces none of the files it writes (the model card ``README.md`` included)
that are already there, unless told to overwrite, and holds the output's lock while it trains (or merges).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import anndata as ad
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from transcriptformer.checkpoint import VOCAB_DIR, WEIGHTS_FILE, Checkpoint, load_checkpoint, save_checkpoint
from transcriptformer.config import CONFIG_FILE
from transcriptformer.console import say
from transcriptformer.data.tokenize import TokenizedCells, read_anndata
from transcriptformer.engine.output import hold_output
from transcriptformer.errors import UserError
from transcriptformer.model import lora
from transcriptformer.model.classifier import (
    CLASSIFIER_CONFIG_FILE,
    CLASSIFIER_WEIGHTS_FILE,
    ClassifierHead,
    ClassifierInfo,
    save_classifier,
)
from transcriptformer.safe_load import sha256_of
from transcriptformer.training.classify import (
    ClassificationModule,
    ClassLabels,
    class_labels,
    class_weights,
    label_column,
    labels_of_cells,
    training_labels,
)
from transcriptformer.training.config import (
    FinetuneConfig,
    TrainConfig,
    TrainDataConfig,
    TrainerConfig,
    require_training_files,
)
from transcriptformer.training.datamodule import CellDataModule, build_datasets
from transcriptformer.training.module import TranscriptFormerModule
from transcriptformer.training.objective import LossTerms, ObjectiveTerms
from transcriptformer.training.scratch import new_checkpoint
from transcriptformer.training.trainer import TrainedOutput, check_resume, dry_run, fit, resolve_hardware

RUN_DIR_NAME = "training_run"
# The files of a fine-tuning output, in the order they are moved into place: adapter_config.json, which makes the
# folder loadable, last.
ADAPTER_OUTPUT_FILES = (
    lora.MODEL_CARD_FILE,
    lora.ADAPTER_WEIGHTS_FILE,
    CLASSIFIER_WEIGHTS_FILE,
    CLASSIFIER_CONFIG_FILE,
    lora.ADAPTER_CONFIG_FILE,
)
# The files of a checkpoint, in the same order: config.json, which makes the folder loadable, last.
CHECKPOINT_OUTPUT_FILES = (VOCAB_DIR, WEIGHTS_FILE, CONFIG_FILE)
PARTIAL_PREFIX = ".partial-"  # the temporary folder of a save in progress, inside the output


def tokenize_files(
    checkpoint: Checkpoint, sources: Sequence[str | Path | ad.AnnData], data: TrainDataConfig
) -> list[TokenizedCells]:
    """Tokenize training or validation cells with the checkpoint's vocabularies and tokenization settings."""
    settings = {"gene_col_name": data.gene_col_name, "invalid_counts": data.invalid_counts}
    tokenizer = checkpoint.tokenizer(**{name: value for name, value in settings.items() if value is not None})
    return [tokenizer.tokenize(source, data.use_raw) for source in sources]


def build_datamodule(
    checkpoint: Checkpoint,
    data: TrainDataConfig,
    seed: int,
    train_sources: Sequence[str | Path | ad.AnnData] | None = None,
    device: torch.device | None = None,
    val_sources: Sequence[ad.AnnData] | None = None,
    labels: ClassLabels | None = None,
) -> CellDataModule:
    """Tokenized training (and validation) cells in a :class:`CellDataModule`.

    Parameters
    ----------
    checkpoint
        Vocabularies and tokenization settings.
    data
        Files, validation split and batching.
    seed
        Seed of the validation split and of the training order.
    train_sources, val_sources
        Training (validation) cells already read (same order as ``data.train_files``, ``data.val_files``); read
        from the files otherwise.
    device
        Where the model trains, which decides how batch lengths are rounded (the CPU by default).
    labels
        The class of each cell of the sources (which must then be given): batches carry them, and the validation
        split is stratified by class.
    """
    require_training_files(data)
    train_sources, val_sources = train_sources or data.train_files, val_sources or data.val_files
    train = tokenize_files(checkpoint, train_sources, data)
    val = tokenize_files(checkpoint, val_sources, data)
    train_labels = val_labels = None
    if labels is not None:
        train_labels = list(map(labels_of_cells, labels.train, train_sources, train))
        val_labels = list(map(labels_of_cells, labels.val, val_sources, val))
    train_set, val_set = build_datasets(train, val, data.val_fraction, seed, train_labels, val_labels)
    multiple = checkpoint.model.length_multiple(device or torch.device("cpu"))
    return CellDataModule(train_set, val_set, train[0].pad_index, data.batch_size, data.n_data_workers, seed, multiple)


def run_dir_of(trainer: TrainerConfig, output: str | Path) -> Path:
    """The run directory: ``trainer.run_dir``, or ``<output>/training_run``."""
    return Path(trainer.run_dir) if trainer.run_dir else Path(output) / RUN_DIR_NAME


def first_device(trainer: TrainerConfig) -> torch.device:
    """The device a dry run uses: the first GPU of ``trainer.device`` (or Apple's GPU), else the CPU."""
    return resolve_hardware(trainer.device).first_device


def require_trainable_attention(trainer: TrainerConfig) -> None:
    """Fail early where the attention backend cannot train: torch has no FlexAttention backward on the CPU."""
    if trainer.attention_backend == "flex" and first_device(trainer).type == "cpu":
        raise ValueError(
            "the flex attention backend cannot train on the CPU (torch has no FlexAttention backward pass there); "
            "use `attention_backend=auto` or chunked (trainer.attention_backend= for transcriptformer train), or a GPU"
        )


def run_pretraining(
    cfg: TrainConfig, dry_run_only: bool = False, overwrite: bool = False, callbacks: Sequence[Callback] = ()
) -> Path | LossTerms:
    """Train a new model from scratch and write its checkpoint directory to ``cfg.output_path``.

    Parameters
    ----------
    cfg
        Model, data, optimisation and trainer settings.
    dry_run_only
        Stop after one forward and backward pass; write nothing.
    overwrite
        Replace a checkpoint already at ``cfg.output_path``.
    callbacks
        Further Lightning callbacks.

    Returns
    -------
    Path or LossTerms
        The checkpoint directory; the loss of the single batch with ``dry_run_only``.
    """
    output = Path(cfg.output_path)
    if not dry_run_only:
        check_checkpoint_output(output, overwrite)
    require_training_files(cfg.data)
    if not dry_run_only:
        check_resume(cfg.trainer, run_dir_of(cfg.trainer, output))
    require_trainable_attention(cfg.trainer)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    adatas = [read_anndata(path) for path in cfg.data.train_files]
    checkpoint = new_checkpoint(cfg, adatas)
    data = build_datamodule(checkpoint, cfg.data, cfg.trainer.seed, adatas, first_device(cfg.trainer))
    module = TranscriptFormerModule(checkpoint.model, cfg.optim, cfg.trainer.seed)
    if dry_run_only:
        return dry_run(module, data, first_device(cfg.trainer))
    gene_files = list(cfg.data_config.esm2_mappings)

    def write(path: Path, final: Path) -> Path:
        return save_checkpoint(path, checkpoint.config, module.model, checkpoint.aux_vocabs, gene_files, overwrite=True)

    save = partial(save_as_one_unit, write, files=CHECKPOINT_OUTPUT_FILES)
    target = TrainedOutput(output, save, what="model", resume_option="trainer.resume=")
    with hold_output_folder(output, CONFIG_FILE, partial(check_checkpoint_output, output, overwrite)):
        fit(module, data, cfg.trainer, run_dir_of(cfg.trainer, output), dataclasses.asdict(cfg), target, callbacks)
    return output


def run_finetuning(
    cfg: FinetuneConfig, dry_run_only: bool = False, overwrite: bool = False, callbacks: Sequence[Callback] = ()
) -> Path | ObjectiveTerms:
    """Train LoRA adapters on a checkpoint (and, for ``task="classify"``, a classification head); save them.

    Parameters
    ----------
    cfg
        Base checkpoint, task, data, LoRA, optimisation and trainer settings.
    dry_run_only
        Stop after one forward and backward pass; write nothing.
    overwrite
        Replace adapters already at ``cfg.output_path``.
    callbacks
        Further Lightning callbacks.

    Returns
    -------
    Path or ObjectiveTerms
        The adapter directory; the objective of the single batch with ``dry_run_only``.
    """
    output = Path(cfg.output_path)
    if not dry_run_only:
        check_adapter_output(output, overwrite)
        check_resume(cfg.trainer, run_dir_of(cfg.trainer, output))
    require_trainable_attention(cfg.trainer)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)  # the initial adapter (and head) weights
    checkpoint = load_checkpoint(cfg.checkpoint_path, attention_backend=cfg.trainer.attention_backend)
    device = first_device(cfg.trainer)
    if cfg.task == "classify":
        train, val, labels = labelled_cells(cfg)
        data = build_datamodule(checkpoint, cfg.data, cfg.trainer.seed, train, device, val, labels)
    else:
        data = build_datamodule(checkpoint, cfg.data, cfg.trainer.seed, device=device)
    model = lora.add_lora_adapters(checkpoint.model, cfg.lora, base_checkpoint=str(checkpoint.path))
    base_sha256 = sha256_of(checkpoint.path / WEIGHTS_FILE)
    if cfg.task == "classify":
        module, write = classification_run(cfg, checkpoint, model, data, labels, base_sha256)
    else:
        module = TranscriptFormerModule(model, cfg.optim, cfg.trainer.seed)
        write = partial(write_adapters, model, base_sha256)
    if dry_run_only:
        return dry_run(module, data, device)
    what = "classifier" if cfg.task == "classify" else "adapters"
    target = TrainedOutput(output, partial(save_as_one_unit, write), what=what, resume_option="`resume` ")
    run_dir = run_dir_of(cfg.trainer, output)
    with hold_output_folder(output, lora.ADAPTER_CONFIG_FILE, partial(check_adapter_output, output, overwrite)):
        trainer = fit(module, data, cfg.trainer, run_dir, dataclasses.asdict(cfg), target, callbacks)
    best = trainer.checkpoint_callback.best_model_score
    if cfg.task == "classify" and best is not None:
        say(f"best validation macro F1: {float(best):.4f} (the weights saved)")
    return output


def check_adapter_output(output: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that is a file, or that holds files fine-tuning writes (without overwrite).

    Those are the adapters, a classifier and a ``README.md`` (:data:`ADAPTER_OUTPUT_FILES`): see
    :func:`check_folder_output`.
    """
    check_folder_output(output, ADAPTER_OUTPUT_FILES, "fine-tuning's files", overwrite)


def check_checkpoint_output(output: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that is a file, or that holds a checkpoint's files (without overwrite).

    Those are the files of :data:`CHECKPOINT_OUTPUT_FILES`: see :func:`check_folder_output`.
    """
    check_folder_output(output, CHECKPOINT_OUTPUT_FILES, "a checkpoint", overwrite)


def check_folder_output(output: Path, files: Sequence[str], what: str, overwrite: bool) -> None:
    """Refuse an output folder that is a file, or that holds any of ``files`` (the run writes them) without overwrite.

    Raises
    ------
    UserError
        ``output`` is a file (``what``, a folder of files, is written there).
    FileExistsError
        It holds a file of ``files`` and ``overwrite`` is off.
    """
    if output.is_file():
        raise UserError(f"output_path {output} is a file; give a folder for {what}")
    existing = [name for name in files if (output / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{output} already holds {what} ({', '.join(existing)}); choose another output_path, or pass "
            "`overwrite=True` to replace them"
        )


@contextlib.contextmanager
def hold_output_folder(output: Path, loadable_file: str, check: Callable[[], None]) -> Iterator[None]:
    """Hold the output's lock (first process only) while training; folders of killed saves are removed first.

    The lock is that of ``output / loadable_file``; ``check`` is run again once it is held.

    Raises
    ------
    UserError
        Another run holds the output.
    FileExistsError
        A run that ended in the meantime wrote there (raised by ``check``).
    """
    if rank_zero_only.rank != 0:  # the other processes of a DDP run: the first one holds the output
        yield
        return
    with hold_output(output / loadable_file, ("output_path",)):
        check()
        for partial_save in output.glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(partial_save, ignore_errors=True)
        yield


def write_adapters(model: torch.nn.Module, base_sha256: str, folder: Path, final: Path) -> None:
    """Write the adapters of ``model`` to ``folder``, with the model card of their place once moved, ``final``.

    ``base_sha256``, the SHA-256 of the base checkpoint's weights file, is recorded with them.
    """
    lora.save_adapters(model, folder, overwrite=True, base_weights_sha256=base_sha256)
    (folder / lora.MODEL_CARD_FILE).write_text(lora.model_card(model, final))


def save_as_one_unit(
    write: Callable[[Path, Path], object], output: Path, files: Sequence[str] = ADAPTER_OUTPUT_FILES
) -> Path:
    """Write ``files`` with ``write`` to a temporary folder inside ``output``, then move them into place.

    The last of ``files`` is what makes the folder loadable (``adapter_config.json``, a checkpoint's
    ``config.json``): the one already there is removed first and the new one moved in last, so that a run killed in
    between leaves no folder that loads. A file (or folder) of the list that ``write`` does not write (a
    classifier's, when adapters replace a classifier) is removed.
    """
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=PARTIAL_PREFIX, dir=output) as temporary:
        written = Path(temporary)
        write(written, output)
        (output / files[-1]).unlink(missing_ok=True)
        for name in files:
            if (output / name).is_dir():
                shutil.rmtree(output / name)
            if (written / name).exists():
                (written / name).replace(output / name)
            else:
                (output / name).unlink(missing_ok=True)
    return output


def labelled_cells(cfg: FinetuneConfig) -> tuple[list[ad.AnnData], list[ad.AnnData], ClassLabels]:
    """The training and validation cells of a classification run, read, and their classes."""
    require_training_files(cfg.data)
    train = [read_anndata(path) for path in cfg.data.train_files]
    val = [read_anndata(path) for path in cfg.data.val_files]
    key = cfg.classify.label_key
    train_labels = [label_column(a, key, path) for a, path in zip(train, cfg.data.train_files, strict=True)]
    val_labels = [label_column(a, key, path) for a, path in zip(val, cfg.data.val_files, strict=True)]
    return train, val, class_labels(train_labels, val_labels, cfg.classify)


def classification_run(
    cfg: FinetuneConfig,
    checkpoint: Checkpoint,
    model: torch.nn.Module,
    data: CellDataModule,
    labels: ClassLabels,
    base_sha256: str,
) -> tuple[ClassificationModule, Callable[[Path, Path], Path]]:
    """The module that trains ``model``'s adapters and a new head, and how the two are written together.

    The writer takes the folder to write and the folder the files end up in (see :func:`save_as_one_unit`);
    ``base_sha256`` is the SHA-256 of the base checkpoint's weights file.
    """
    settings = cfg.classify
    embed_dim = checkpoint.config.model_config.embed_dim
    try:
        head = ClassifierHead(embed_dim, len(labels.classes), settings.head_hidden_dim)
    except RuntimeError as error:  # torch's allocation failure, CUDA's out-of-memory error among them
        if "allocate" not in str(error):
            raise
        raise UserError(
            f"a classification head of head_hidden_dim {settings.head_hidden_dim} does not fit in memory; choose a "
            "smaller head_hidden_dim (0: a linear head)"
        ) from None
    weights = class_weights(training_labels(data), len(labels.classes), settings.class_weights)
    module = ClassificationModule(model, head, weights, cfg.optim, cfg.trainer.seed)

    def write(path: Path, final: Path) -> Path:
        write_adapters(model, base_sha256, path, final)
        info = ClassifierInfo(
            label_key=labels.label_key,
            classes=labels.classes,
            embed_dim=embed_dim,
            hidden_dim=settings.head_hidden_dim,
            base_checkpoint=str(checkpoint.path),
            base_weights_sha256=base_sha256,
            adapter_sha256=sha256_of(Path(path) / lora.ADAPTER_WEIGHTS_FILE),
        )
        return save_classifier(module.head, info, path)

    return module, write


def merge_adapters_into_checkpoint(
    checkpoint_path: str | Path, adapter_path: str | Path, output_path: str | Path, overwrite: bool = False
) -> Path:
    """Fold saved adapters into their base checkpoint and write the result as a new checkpoint directory.

    The checkpoint is written as one unit (see :func:`save_as_one_unit`) while holding the output's lock.

    Raises
    ------
    UserError
        When ``output_path`` is the base checkpoint itself (merging in place would replace the weights the adapters
        belong to), or a file, or another run holds it.
    FileExistsError
        When ``output_path`` holds a checkpoint and ``overwrite`` is off.
    """
    output = Path(output_path)
    check_checkpoint_output(output, overwrite)
    checkpoint = load_checkpoint(checkpoint_path)
    if output.resolve() == checkpoint.path.resolve():
        raise UserError(
            f"output_path {output} is the base checkpoint itself: merging in place would replace the weights the "
            "adapters were trained on; choose another output_path"
        )
    merged = lora.load_adapters(checkpoint.model, adapter_path, merge=True, base_weights=checkpoint.path / WEIGHTS_FILE)
    vocab_dir = checkpoint.path / VOCAB_DIR
    gene_files = [vocab_dir / name for name in checkpoint.config.data_config.esm2_mappings]

    def write(path: Path, final: Path) -> Path:
        return save_checkpoint(path, checkpoint.config, merged, checkpoint.aux_vocabs, gene_files, overwrite=True)

    with hold_output_folder(output, CONFIG_FILE, partial(check_checkpoint_output, output, overwrite)):
        return save_as_one_unit(write, output, CHECKPOINT_OUTPUT_FILES)
