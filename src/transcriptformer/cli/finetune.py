r"""``transcriptformer finetune``: train LoRA adapters on a checkpoint with your cells (or a cell classifier).

::

    transcriptformer finetune --checkpoint-path CKPT --train-files cells.h5ad --lora-r 4 --output-path adapters/mine
    transcriptformer finetune --task classify --label-key cell_type --checkpoint-path CKPT --train-files cells.h5ad \
        --val-fraction 0.15 --output-path classifiers/cell_type
"""

from __future__ import annotations

import argparse
import re

from transcriptformer.cli.common import (
    CHECKPOINT_HELP,
    USE_RAW,
    add_hidden_alias,
    add_invalid_counts_argument,
    add_overwrite_argument,
    add_use_raw_argument,
    checkpoint_folder,
    non_negative_int,
    positive_int,
    print_dry_run,
)
from transcriptformer.console import print_output
from transcriptformer.errors import UserError
from transcriptformer.model.lora import TARGET_ALIASES, LoraConfig
from transcriptformer.runtime import BACKENDS, PRECISIONS
from transcriptformer.training.config import (
    CLASS_WEIGHTS,
    TASKS,
    ClassifyConfig,
    FinetuneConfig,
    OptimConfig,
    TrainDataConfig,
    TrainerConfig,
    task_default,
    task_section,
)

# The settings whose flag is not ``--<name>`` (or ``--lora-<name>``).
FLAG_OF_SETTING = {"trainer.max_epochs": "--epochs", "trainer.gradient_clip_val": "--gradient-clip"}
SETTING = re.compile(r"\b(?:data|optim|trainer|lora|classify)\.(\w+)")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``finetune``."""
    parser.description = (
        "Fine-tune a TranscriptFormer checkpoint with LoRA adapters (peft); base weights stay frozen. "
        "Writes the adapters alone (adapter_config.json + adapter_model.safetensors) to --output-path; "
        "with --task classify, also a classification head on the cell embedding (classifier_head.safetensors, "
        "classifier.json), which predict-labels uses."
    )
    add_finetune_arguments(parser)
    parser.set_defaults(func=run)


def default_by_task(section: str, name: str) -> str:
    """``(default: 0.0001; with --task classify: 0.003)``: the defaults of a setting that depends on the task."""
    shown = [task_default(task, section, name) for task in TASKS]
    shown = [" ".join(value) if isinstance(value, list) else str(value) for value in shown]
    return f"(default: {shown[0]}; with --task classify: {shown[1]})"


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``finetune`` (shared with ``finetune_lora.py``)."""
    lora, optim, trainer, data = LoraConfig(), OptimConfig(), TrainerConfig(), TrainDataConfig()
    classify = ClassifyConfig()
    parser.add_argument(
        "--task",
        choices=TASKS,
        default=FinetuneConfig.task,
        help="generative: the pretraining objective on your cells; classify: a cell classifier of --label-key "
        "(default: %(default)s)",
    )
    io = parser.add_argument_group("model and data")
    io.add_argument("--checkpoint-path", required=True, help=f"base checkpoint: {CHECKPOINT_HELP}")
    io.add_argument("--train-files", nargs="+", required=True, metavar="H5AD", help="training cells (.h5ad files)")
    io.add_argument("--val-files", nargs="+", default=[], metavar="H5AD", help="validation cells (.h5ad files)")
    io.add_argument(
        "--val-fraction",
        type=float,
        help="share of the training cells held out for validation when no --val-files are given "
        + default_by_task("data", "val_fraction"),
    )
    io.add_argument(
        "--gene-col-name", default=data.gene_col_name, help="var column with gene ids (default: the checkpoint's)"
    )
    add_use_raw_argument(io)
    add_invalid_counts_argument(io)
    io.add_argument(
        "--output-path",
        help="adapter directory to write (required unless --dry-run); a name such as adapters.pt is a directory too",
    )
    add_overwrite_argument(io, "adapters")
    workers = io.add_argument(
        "--n-data-workers",
        type=non_negative_int,
        default=data.n_data_workers,
        help="data-loader worker processes (default: %(default)s)",
    )
    add_hidden_alias(io, "--num-workers", workers)

    classes = parser.add_argument_group("classification (--task classify)")
    classes.add_argument(
        "--label-key", default=classify.label_key, help="obs column of each cell's class, e.g. cell_type"
    )
    classes.add_argument(
        "--class-weights",
        choices=CLASS_WEIGHTS,
        default=classify.class_weights,
        help="balanced: weight each class's cross-entropy by the inverse of its share of cells (default: %(default)s)",
    )
    classes.add_argument(
        "--min-cells-per-class",
        type=positive_int,
        default=classify.min_cells_per_class,
        help="classes with fewer training cells are left out, with a warning (default: %(default)s)",
    )
    classes.add_argument(
        "--head-hidden-dim",
        type=non_negative_int,
        default=classify.head_hidden_dim,
        help="hidden width of the classification head (an MLP); 0: a linear head (default: %(default)s)",
    )

    adapters = parser.add_argument_group("LoRA")
    adapters.add_argument("--lora-r", type=positive_int, default=lora.r, help="adapter rank (default: %(default)s)")
    adapters.add_argument("--lora-alpha", type=float, default=lora.alpha, help="LoRA alpha (default: %(default)s)")
    adapters.add_argument(
        "--lora-dropout", type=float, default=lora.dropout, help="dropout on adapter inputs (default: %(default)s)"
    )
    adapters.add_argument(
        "--lora-target-modules",
        nargs="+",
        metavar="MODULE",
        help=f"layers to adapt: {', '.join(TARGET_ALIASES)} or module names such as linears.0 "
        + default_by_task("lora", "target_modules"),
    )
    adapters.add_argument(
        "--train-heads", action="store_true", help="also train full copies of the count and gene-id heads"
    )

    loop = parser.add_argument_group("optimisation")
    loop.add_argument(
        "--epochs", type=int, help="passes over the training cells " + default_by_task("trainer", "max_epochs")
    )
    loop.add_argument(
        "--max-steps",
        type=int,
        default=trainer.max_steps,
        help="stop after this many optimizer steps, -1: no limit (default: %(default)s)",
    )
    loop.add_argument(
        "--batch-size",
        type=positive_int,
        help="cells per batch and device " + default_by_task("data", "batch_size"),
    )
    loop.add_argument(
        "--accumulate-grad-batches",
        type=positive_int,
        default=trainer.accumulate_grad_batches,
        help="batches per optimizer step (default: %(default)s)",
    )
    loop.add_argument("--lr", type=float, help="peak learning rate " + default_by_task("optim", "lr"))
    loop.add_argument(
        "--weight-decay", type=float, default=optim.weight_decay, help="AdamW weight decay (default: %(default)s)"
    )
    loop.add_argument(
        "--warmup-steps", type=int, help="linear warm-up steps " + default_by_task("optim", "warmup_steps")
    )
    loop.add_argument(
        "--gradient-clip",
        type=float,
        default=trainer.gradient_clip_val,
        help="gradient-norm clip, 0: off (default: %(default)s)",
    )
    loop.add_argument(
        "--early-stopping-patience",
        type=int,
        help="stop after this many validations without improvement (of the loss; of the macro F1 with --task "
        "classify), 0: off; needs validation cells " + default_by_task("trainer", "early_stopping_patience"),
    )
    loop.add_argument(
        "--seed", type=int, default=trainer.seed, help="seed of data order, split and dropout (default: %(default)s)"
    )

    run_group = parser.add_argument_group("hardware, checkpoints and logs")
    device = run_group.add_argument(
        "--device",
        default=trainer.device,
        help="cpu or 0: CPU; cpu:N: N CPU processes (DDP over gloo); N: N GPUs (DDP when N > 1); cuda: every GPU; "
        "mps: Apple's GPU; auto: every GPU, else CPU (default: %(default)s)",
    )
    add_hidden_alias(run_group, "--devices", device)
    run_group.add_argument(
        "--num-nodes", type=int, default=trainer.num_nodes, help="machines for multi-node DDP (default: %(default)s)"
    )
    run_group.add_argument(
        "--precision", choices=PRECISIONS, default=trainer.precision, help="numeric precision (default: %(default)s)"
    )
    run_group.add_argument(
        "--attention-backend",
        choices=BACKENDS,
        default=trainer.attention_backend,
        help="attention implementation; auto: flex on CUDA, chunked elsewhere (default: %(default)s)",
    )
    run_group.add_argument(
        "--run-dir", default=None, help="metrics.csv and resumable checkpoints (default: OUTPUT_PATH/training_run)"
    )
    run_group.add_argument(
        "--checkpoint-every-n-steps",
        type=int,
        default=trainer.checkpoint_every_n_steps,
        help="resumable checkpoint every N steps, 0: each epoch (default: %(default)s)",
    )
    run_group.add_argument("--resume", default=None, help="resume from a Lightning checkpoint, or 'last'")
    run_group.add_argument(
        "--dry-run",
        action="store_true",
        help="load model and data, run one forward and backward pass, print 'Dry-run complete'; writes nothing",
    )


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The :class:`FinetuneConfig` the flags describe."""
    use_raw = USE_RAW[args.use_raw]
    return FinetuneConfig(
        checkpoint_path=checkpoint_folder(args.checkpoint_path),
        output_path=args.output_path or "",
        task=args.task,
        data=task_section(
            args.task,
            "data",
            train_files=list(args.train_files),
            val_files=list(args.val_files),
            val_fraction=args.val_fraction,
            gene_col_name=args.gene_col_name,
            invalid_counts=args.invalid_counts,
            use_raw=use_raw,
            batch_size=args.batch_size,
            n_data_workers=args.n_data_workers,
        ),
        optim=task_section(
            args.task, "optim", lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps
        ),
        trainer=task_section(
            args.task,
            "trainer",
            device=args.device,
            num_nodes=args.num_nodes,
            precision=args.precision,
            max_epochs=args.epochs,
            max_steps=args.max_steps,
            accumulate_grad_batches=args.accumulate_grad_batches,
            gradient_clip_val=args.gradient_clip,
            checkpoint_every_n_steps=args.checkpoint_every_n_steps,
            early_stopping_patience=args.early_stopping_patience,
            seed=args.seed,
            run_dir=args.run_dir,
            resume=args.resume,
            attention_backend=args.attention_backend,
        ),
        lora=task_section(
            args.task,
            "lora",
            r=args.lora_r,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            target_modules=args.lora_target_modules and list(args.lora_target_modules),
            train_heads=args.train_heads,
        ),
        classify=ClassifyConfig(
            label_key=args.label_key,
            class_weights=args.class_weights,
            min_cells_per_class=args.min_cells_per_class,
            head_hidden_dim=args.head_hidden_dim,
        ),
    )


def run(args: argparse.Namespace) -> int:
    """Fine-tune, or check the setup with ``--dry-run``; the flags are checked before torch and Lightning load."""
    if not args.output_path and not args.dry_run:
        raise ValueError("--output-path is required (unless --dry-run)")
    try:
        config = config_from_args(args)
    except ValueError as error:
        raise UserError(with_flag_of_setting(str(error))) from None
    from transcriptformer.training.run import run_finetuning

    result = run_finetuning(config, dry_run_only=args.dry_run, overwrite=args.overwrite)
    if args.dry_run:
        print_dry_run(result)
    else:
        from lightning.pytorch.utilities import rank_zero_only  # imported by the run already

        if rank_zero_only.rank == 0:  # under DDP, every process returns here
            print(f"{'Classifier' if args.task == 'classify' else 'Adapters'} saved.")
            print_output(result)
    return 0


def with_flag_of_setting(message: str) -> str:
    """``message`` with each setting it names (``trainer.max_epochs``, ``optim.lr``) named by its flag instead."""
    parser = argparse.ArgumentParser(add_help=False)
    add_finetune_arguments(parser)
    flags = {option for action in parser._actions for option in action.option_strings}

    def flag(match: re.Match) -> str:
        name = match.group(1) or ""
        candidates = [FLAG_OF_SETTING.get(match.group(0)), f"--{name.replace('_', '-')}", f"--lora-{name}"]
        return next((option for option in candidates if option in flags), match.group(0))

    return SETTING.sub(flag, message)
