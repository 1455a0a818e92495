"""What the subcommands share: error reporting and the flags that several of them take."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from typing import TYPE_CHECKING

from transcriptformer.config import INVALID_COUNTS, DataConfig
from transcriptformer.engine.config import ALL_OBS_KEYS, SECTION_OF, OutputConfig, RunConfig, apply_overrides
from transcriptformer.model.outputs import OUTPUT_KEYS
from transcriptformer.runtime import BACKENDS, DEVICES, PRECISIONS

CHECKPOINT_HELP = (
    "checkpoint folder (config.json, model_weights.pt, vocabs/), or a published model: tf-sapiens, tf-exemplar, "
    "tf-metazoa (downloaded into the cache on first use)"
)

if TYPE_CHECKING:
    from pathlib import Path

    from transcriptformer.engine.task import Task
    from transcriptformer.training.objective import ObjectiveTerms

# --use-raw: which count matrix to read.
USE_RAW = {"auto": None, "true": True, "false": False}


def report_user_error(command: str, error: BaseException, parser: argparse.ArgumentParser | None = None) -> int:
    """Print ``transcriptformer COMMAND: error: MESSAGE`` on one line and return the exit code 1.

    With the command's ``parser``, the settings that the message names as parameters are named by their flags
    (:func:`with_flag_names`).
    """
    message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    if parser is not None and "config override" not in message:  # an override's error names its keys as written
        message = with_flag_names(message, parser)
    print(f"transcriptformer {command}: error: {message}", file=sys.stderr)
    return 1


# A parameter that library code marks in backticks, with an optional value: `organism`, `invalid_counts='drop'`.
MARKED_PARAMETER = re.compile(r"`(?P<name>[a-z][a-z0-9_]*)(?:=(?P<value>[^`\s]+))?`")


def with_flag_names(message: str, parser: argparse.ArgumentParser) -> str:
    """``message`` of library code, which names settings as parameters, with the flags of ``parser`` instead."""
    return FlagNames.of(parser)(message)


@dataclasses.dataclass(frozen=True)
class FlagNames:
    """Rewords messages of library code, which name settings as parameters, with a command's flags.

    A flag's setting shares its name (its ``dest``), so library code speaks of ``max_genes`` and a command's user
    reads ``--max-genes``. Two forms are translated, so that ordinary words are never touched: a parameter in
    backticks (```resume```, ```invalid_counts='drop'``` becomes ``--invalid-counts drop``, ```overwrite=True```
    the switch ``--overwrite``), and a setting whose name has an underscore, as a whole word (``max_genes``). A
    name that is no flag of the command and a dotted key (``predict.batch_size``, as in
    ``--config-override``) are left as they are. Plain data, so that the processes of a run word alike.

    Attributes
    ----------
    flags : dict
        Setting name -> (flag, kind): ``switch`` (``--overwrite``), ``negatable`` (``--[no-]filter-to-vocabs``)
        or ``value`` (``--batch-size 8``).
    """

    flags: dict[str, tuple[str, str]]

    @classmethod
    def of(cls, parser: argparse.ArgumentParser) -> FlagNames:
        """The flags of ``parser``: each setting's first flag (a hidden former name comes after it)."""
        flags: dict[str, tuple[str, str]] = {}
        for action in parser._actions:
            flag = next((option for option in action.option_strings if option.startswith("--")), None)
            if flag is None:
                continue
            kind = "value"
            if isinstance(action, argparse.BooleanOptionalAction):
                kind = "negatable"
            elif isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
                kind = "switch"
            flags.setdefault(action.dest, (flag, kind))
        return cls(flags)

    def __call__(self, message: str) -> str:
        """``message`` with the flags for the settings it names."""
        message = MARKED_PARAMETER.sub(self._marked, message)
        for name, (flag, _) in self.flags.items():
            if "_" in name:
                message = re.sub(rf"(?<![\w./`-]){re.escape(name)}(?![\w=./`-])", flag, message)
        return message

    def _marked(self, match: re.Match) -> str:
        if match["name"] not in self.flags:
            return match[0]
        flag, kind = self.flags[match["name"]]
        value = match["value"]
        if value is None:
            return flag
        value = value.strip("'\"")
        if kind == "negatable":
            return flag if value == "True" else "--no-" + flag.removeprefix("--")
        return flag if kind == "switch" else f"{flag} {value}"


def add_hidden_alias(group: argparse._ActionsContainer, alias: str, action: argparse.Action) -> None:
    """``alias``, a former name of ``action``'s flag, sets the same setting; ``--help`` shows only the flag."""
    hidden = {"dest": action.dest, "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
    if isinstance(action, argparse._StoreTrueAction):
        group.add_argument(alias, action="store_true", **hidden)
    else:
        group.add_argument(alias, type=action.type, nargs=action.nargs, choices=action.choices, **hidden)


def positive_int(text: str) -> int:
    """A whole number of at least 1 (attempts, workers): an argparse ``type``."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number of at least 0 (worker processes, 0: none): an argparse ``type``."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number above 0 (seconds, factors): an argparse ``type``."""
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def add_use_raw_argument(group: argparse._ActionsContainer) -> None:
    """``--use-raw auto|true|false`` in any case, as the original's ``True``/``False``.

    The namespace holds the lower-case string; :data:`USE_RAW` maps it.
    """
    group.add_argument(
        "--use-raw",
        type=str.lower,
        choices=list(USE_RAW),
        default="auto",
        help="counts from adata.raw.X (true), adata.X (false), or raw when present (auto); any case "
        "(default: %(default)s)",
    )


def add_invalid_counts_argument(group: argparse._ActionsContainer) -> None:
    """``--invalid-counts error|drop|clip``: what to do with NaN, infinite or negative counts."""
    group.add_argument(
        "--invalid-counts",
        choices=INVALID_COUNTS,
        default=DataConfig.invalid_counts,
        help="counts that are NaN, infinite or negative: error stops naming them, drop leaves out their cells, "
        "clip sets them to 0 (infinite ones to --clip-counts) (default: %(default)s)",
    )


def positive_number(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def add_overwrite_argument(group: argparse._ActionsContainer, what: str) -> None:
    """``--overwrite``: replace ``what`` at the output path."""
    group.add_argument("--overwrite", action="store_true", help=f"replace {what} already at the output path")


def add_run_arguments(
    parser: argparse.ArgumentParser,
    defaults: RunConfig,
    checkpoint_required: bool = True,
    rows_are_cells: bool = True,
) -> tuple[argparse._ArgumentGroup, argparse._ArgumentGroup, argparse._ArgumentGroup]:
    """The flags of a run through :func:`~transcriptformer.engine.run.run_task`, with the settings ``defaults``.

    Returns the groups ``inputs and output``, ``reading the cells`` and ``model and hardware``, for a command's own
    flags. :func:`run_config_from_args` reads them. ``checkpoint_required``: ``False`` for a command that can run
    without a model (it checks ``--checkpoint-path`` itself); ``rows_are_cells``: ``False`` for a command whose output
    rows are not the input cells (no ``--keep-counts``).
    """
    inputs, output, predict, hardware = defaults.input, defaults.output, defaults.predict, defaults.hardware
    io = parser.add_argument_group("inputs and output")
    io.add_argument(
        "--checkpoint-path",
        required=checkpoint_required,
        help=CHECKPOINT_HELP,
    )
    cells = io.add_mutually_exclusive_group(required=True)
    cells.add_argument(
        "--data-file",
        dest="data_files",
        nargs="+",
        default=inputs.data_files,
        metavar="FILE",
        help="input .h5ad, .zarr or 10x .h5 file(s), their cells concatenated in order",
    )
    cells.add_argument(
        "--soma",
        metavar="URI",
        help="or a TileDB-SOMA experiment, or a copy of the CELLxGENE Census: folder or s3:// URI (docs/scale.md)",
    )
    cells.add_argument(
        "--census-version",
        metavar="VERSION",
        help="or the public CELLxGENE Census of this version, e.g. stable (needs the network)",
    )
    add_output_arguments(io, output)
    if rows_are_cells:
        io.add_argument(
            "--keep-counts",
            action="store_true",
            help="write the outputs into a copy of the input: its counts as X and its var (one --data-file)",
        )
    io.add_argument(
        "--output-keys",
        nargs="+",
        choices=OUTPUT_KEYS,
        default=list(predict.output_keys),
        metavar="KEY",
        help=f"outputs to compute, any of {', '.join(OUTPUT_KEYS)} (default: %(default)s)",
    )
    io.add_argument(
        "--obs-keys",
        nargs="+",
        default=output.obs_keys,
        metavar="COLUMN",
        help=f"obs columns to keep in the output; {ALL_OBS_KEYS}: every column (default: %(default)s)",
    )
    io.add_argument("--dry-run", action="store_true", help="check checkpoint, data and vocabulary, print the plan")

    soma = parser.add_argument_group("cells of a SOMA experiment (--soma, --census-version)")
    soma.add_argument(
        "--organism",
        help="the experiment of a Census, e.g. homo_sapiens or 'Mus musculus'; for an experiment, recorded only",
    )
    soma.add_argument(
        "--obs-filter",
        metavar="FILTER",
        help="SOMA value filter selecting the cells (of files too), e.g. "
        "\"tissue_general == 'lung' and is_primary_data == True\"",
    )
    soma.add_argument(
        "--soma-measurement", default=inputs.soma_measurement, help="measurement to read (default: %(default)s)"
    )
    soma.add_argument(
        "--soma-x-layer",
        default=inputs.soma_x_layer,
        help="X layer of raw counts (default: %(default)s, or the experiment's one layer when it has no such layer)",
    )

    data = parser.add_argument_group("reading the cells (defaults: the checkpoint's data_config)")
    data.add_argument(
        "--gene-col-name",
        default=None,
        help="var column with gene ids; 'index': var_names (default: the checkpoint's, else feature_id, else var "
        "names that hold gene ids)",
    )
    add_use_raw_argument(data)
    data.add_argument("--clip-counts", type=positive_number, default=None, help="clip counts to at most this value")
    add_invalid_counts_argument(data)
    data.add_argument(
        "--drop-empty-cells",
        action="store_true",
        default=DataConfig.drop_empty_cells,
        help="leave out the cells without any count among the genes read; kept, they get NaN outputs "
        "and are counted in the summary",
    )
    data.add_argument(
        "--filter-to-vocabs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drop genes the vocabulary lacks; with --no-filter-to-vocabs they are an error",
    )
    data.add_argument(
        "--remove-duplicate-genes",
        action="store_true",
        help="keep the first of duplicated gene ids instead of stopping with an error",
    )
    data.add_argument(
        "--n-data-workers",
        type=non_negative_int,
        default=hardware.n_data_workers,
        help="threads reading and tokenizing the next cells while the model runs (default: %(default)s)",
    )

    model = parser.add_argument_group("model and hardware")
    model.add_argument(
        "--pretrained-embedding",
        nargs="+",
        default=defaults.model.pretrained_embedding,
        metavar="H5",
        help="gene-embedding file(s) replacing the model's table, for a species it was not trained on",
    )
    model.add_argument(
        "--adapter",
        default=defaults.model.adapter,
        metavar="DIR",
        help="LoRA adapters from 'transcriptformer finetune', merged into the checkpoint's weights",
    )
    add_batch_arguments(
        model,
        batch_size=predict.batch_size,
        max_tokens=predict.max_tokens,
        chunk_size=output.chunk_size,
        chunk_help="cells read, run and saved together; memory and --resume granularity",
        precision=predict.precision,
        device=hardware.device,
    )
    add_num_gpus_argument(model, hardware.num_gpus)
    model.add_argument(
        "--attention-backend",
        choices=BACKENDS,
        default=hardware.attention_backend,
        help="auto: compiled flex attention on CUDA, exact chunked attention elsewhere (default: %(default)s)",
    )
    model.add_argument(
        "--config-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any setting, Hydra grammar, repeatable: model.data_config.normalize_to_scale=10000, "
        "predict.output_keys=[embeddings,llh], model.data_config.clip_counts=null",
    )
    return io, data, model


def add_output_arguments(group: argparse._ActionsContainer, output: OutputConfig) -> None:
    """The flags of where a run through the engine writes: output folder and file name, overwrite, resume."""
    group.add_argument("--output-path", default=output.output_path, help="output directory (default: %(default)s)")
    group.add_argument(
        "--output-filename", default=output.output_filename, help="output file name (default: %(default)s)"
    )
    add_overwrite_argument(group, "an output file")
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run with the same settings from its last completed chunk of cells",
    )


def add_num_gpus_argument(group: argparse._ActionsContainer, num_gpus: int) -> None:
    """``--num-gpus``: the processes of a run through the engine."""
    group.add_argument(
        "--num-gpus",
        type=int,
        default=num_gpus,
        help="processes, one per GPU; -1: every visible GPU; on CPU, CPU processes (default: %(default)s)",
    )


def add_batch_arguments(
    group: argparse._ActionsContainer,
    *,
    batch_size: int,
    max_tokens: int | None,
    chunk_size: int,
    chunk_help: str,
    precision: str | None,
    device: str,
) -> None:
    """The flags of how cells run through the batch loop: batch size or token budget, chunks, precision, device."""
    group.add_argument(
        "--batch-size",
        type=positive_int,
        default=batch_size,
        help="cells per forward pass at most (default: %(default)s)",
    )
    budget = group.add_argument(
        "--max-tokens",
        type=positive_int,
        default=max_tokens,
        metavar="N",
        help="token budget per forward pass (cells x trimmed length) instead of a fixed --batch-size",
    )
    add_hidden_alias(group, "--max-tokens-per-batch", budget)
    group.add_argument(
        "--chunk-size", type=positive_int, default=chunk_size, help=f"{chunk_help} (default: %(default)s)"
    )
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=precision,
        help="32, or mixed precision 16-mixed / bf16-mixed (default: 16-mixed on CUDA, 32 elsewhere)",
    )
    group.add_argument(
        "--device", choices=DEVICES, default=device, help="auto: CUDA, then MPS, then CPU (default: %(default)s)"
    )


def checkpoint_folder(name_or_path: str) -> str:
    """The folder of ``--checkpoint-path``: a folder, or a published name downloaded into the cache on first use."""
    from transcriptformer.hub.cache import resolve_checkpoint

    return str(resolve_checkpoint(name_or_path))


def run_config_from_args(args: argparse.Namespace, **settings: object) -> RunConfig:
    """A run's settings from the flags of :func:`add_run_arguments`.

    The checkpoint's config, then the flags (and ``settings``, which win), then ``--config-override``. A flag named
    like a setting of a run sets it (:meth:`RunConfig.replace`; a setting without a flag keeps its default); one
    named like a :class:`~transcriptformer.config.DataConfig` field, when given, replaces the checkpoint's value.
    """
    flags = vars(args) | {"use_raw": USE_RAW[args.use_raw]} | settings
    config = RunConfig.from_checkpoint(
        checkpoint_folder(args.checkpoint_path), **{k: v for k, v in flags.items() if k in SECTION_OF}
    )
    given = {f.name: flags[f.name] for f in dataclasses.fields(DataConfig) if flags.get(f.name) is not None}
    config.model.data_config = dataclasses.replace(config.model.data_config, **given)  # checks the values
    return apply_overrides(config, args.config_override)


def run_task(task: Task, config: RunConfig, dry_run: bool = False) -> Path:
    """Check ``task`` against ``config``, then run it with :func:`transcriptformer.engine.run.run_task`.

    The check runs before the engine, torch and the model are imported: a task's checks of its settings come before
    anything heavy, so that a mistake in the arguments is reported at once.
    """
    task.check(config)
    from transcriptformer.engine.run import run_task as run_checked_task

    return run_checked_task(task, config, dry_run=dry_run, checked=True)


def print_dry_run(terms: ObjectiveTerms) -> None:
    """Report a successful training dry run (one forward and backward pass)."""
    print(f"one batch: {terms.summary()}; forward and backward passed")
    print("Dry-run complete")
