"""The ``transcriptformer`` command line: one module per subcommand, plus :mod:`~transcriptformer.cli.common`.

A subcommand module (``inference`` for ``transcriptformer inference``, ``merge_adapters`` for ``merge-adapters``)
defines ``configure(parser)``, which adds the subcommand's description and arguments to the parser it is given and
sets ``func`` (called with the parsed namespace, returning an exit code) through ``set_defaults``. Only the module
of the command being run is imported, so that ``--help`` and ``--version`` answer at once. Every subcommand takes
``--quiet`` and ``--verbose`` (see :mod:`transcriptformer.console`). :func:`main` reports an error the user can fix
in one line with exit code 1; argparse reports usage errors, with the subcommand's usage, with exit code 2.

Library code names settings as parameters (``max_genes``, ```overwrite=True```); :func:`main` is the one place
where its errors, warnings and progress messages are reworded with the command's flags (``--max-genes``,
``--overwrite``; :func:`~transcriptformer.cli.common.with_flag_names`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from transcriptformer.cli.common import FlagNames, report_user_error
from transcriptformer.console import verbosity
from transcriptformer.errors import UserError
from transcriptformer.runtime import torch_threads_kept
from transcriptformer.version import __version__

# Every subcommand with its one-line help, in the order of --help.
COMMANDS: dict[str, str] = {
    "inference": "embed and score the cells of h5ad files; write one h5ad",
    "score": "log-likelihood of each cell and gene under the model; flag outlier cells",
    "perturb": "knock genes out of cells or over-express them in silico; compare the model's outputs",
    "screen": "knock out or over-express every expressed gene, one at a time; rank genes with statistics",
    "train": "pretrain a model from scratch on .h5ad files (Hydra config)",
    "finetune": "train LoRA adapters on a checkpoint with your cells, or a cell classifier (--task classify)",
    "annotate": "label cells from a labelled reference (neighbours in a vector index, Unknown); write one h5ad",
    "predict-labels": "label cells with a classifier from finetune --task classify; write one h5ad",
    "merge-adapters": "merge LoRA adapters into their base checkpoint",
    "generate": "sample new cells from a checkpoint (genes and counts); write one h5ad",
    "evaluate": "judge cell embeddings against baselines on labelled cells: table, JSON, figures",
    "download": "download and unpack published checkpoints",
    "download-data": "download CELLxGENE Discover datasets by species",
    "genes": "list the genes of a checkpoint's vocabulary (id, symbol, species)",
    "doctor": "check the environment: torch build, GPU, FlexAttention, batch sizes",
    "build-vocab": "build <species>_gene.h5 from a protein FASTA with a local ESM-2 model",
}
# Errors caused by the command's input (paths, settings, data, network), reported in one line without a traceback.
USER_ERRORS = (UserError, OSError, KeyError, ValueError)


def output_options() -> argparse.ArgumentParser:
    """``--quiet`` / ``--verbose``, the parent parser of every subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_mutually_exclusive_group()
    group.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const="quiet",
        help="print only warnings, errors and the result (no progress messages or bars)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const="verbose",
        help="also print the logs and deprecation warnings of the libraries used (Lightning, torch, ...)",
    )
    return parent


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The root parser; the subcommands in ``commands`` (all by default) get their full arguments."""
    parser = argparse.ArgumentParser(
        prog="transcriptformer",
        description="TranscriptFormer: embed and score single cells, fine-tune and train, on CPU or GPU.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    parent = output_options()
    for name, help_text in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text, parents=[parent])
        subparser.set_defaults(command=name)
        if commands is None or name in commands:
            importlib.import_module(f"transcriptformer.cli.{name.replace('-', '_')}").configure(subparser)
    return parser


def subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of the subcommand ``name`` of the root ``parser``."""
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices[name]


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag is reported with the usage of its subcommand (exit code 2)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        owner = subcommand_parser(parser, args.command) if hasattr(args, "command") else parser
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``transcriptformer`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser([chosen] if chosen in COMMANDS else [])
    args = parse_arguments(parser, argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    name = f"transcriptformer {args.command}"
    command = subcommand_parser(parser, args.command)
    try:
        with verbosity(args.verbosity, name, FlagNames.of(command)), torch_threads_kept():
            return int(args.func(args) or 0)
    except BrokenPipeError:  # what reads the output stopped early (`| head`): end quietly, as Unix tools do
        stop_writing_stdout()
        return 128 + 13  # the shell's status of a process that SIGPIPE ended
    except USER_ERRORS as error:
        return report_user_error(args.command, error, command)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


def stop_writing_stdout() -> None:
    """Point standard output at the null device, so that Python's flush at exit does not fail on the closed pipe."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # a stream without a file descriptor (io.UnsupportedOperation is both)
        pass
