"""``transcriptformer download``: fetch and unpack the published checkpoints."""

from __future__ import annotations

import argparse

from transcriptformer.cli.common import positive_float, positive_int
from transcriptformer.console import print_output, say
from transcriptformer.errors import UserError
from transcriptformer.hub.artifacts import BASE_URL_ENV, CHOICES, MAX_EXPANSION, download_artifact, resolve_artifacts
from transcriptformer.hub.http import RetryPolicy

EXAMPLES = f"""\
examples:
  transcriptformer download tf-sapiens
  transcriptformer download all --checkpoint-dir /data/checkpoints
  transcriptformer download tf-exemplar --base-url https://mirror.example.org/transcriptformer

An interrupted download resumes where it stopped when the command is run again. The base URL can also be set
with ${BASE_URL_ENV}.

documentation: docs/downloads.md
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``download``."""
    parser.description = "Download the published TranscriptFormer checkpoints (resumable, verified, safely extracted)."
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "model",
        choices=CHOICES,
        help="tf-sapiens, tf-exemplar, tf-metazoa, all-embeddings (the gene-embedding tables of every species), "
        "or all (the three models and the embeddings)",
    )
    parser.add_argument(
        "--checkpoint-dir", default="./checkpoints", help="folder that receives <model>/ (default: %(default)s)"
    )
    parser.add_argument(
        "--base-url", default=None, help=f"download from this address instead of the public bucket (${BASE_URL_ENV})"
    )
    parser.add_argument(
        "--sha256", default=None, help="expected SHA-256 of the archive, 64 hexadecimal digits (single model only)"
    )
    parser.add_argument(
        "--retries",
        type=positive_int,
        default=RetryPolicy.attempts,
        help="attempts per archive before giving up (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=RetryPolicy.timeout_s,
        help="seconds a connection may stall (default: %(default)s)",
    )
    parser.add_argument(
        "--max-expansion",
        type=positive_float,
        default=MAX_EXPANSION,
        help="the unpacked files may total at most this many times the archive's size, a guard against "
        "decompression bombs (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="download again and replace an existing folder")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Download every requested artifact; the first failure stops the command."""
    artifacts = resolve_artifacts(args.model)
    if args.sha256 and len(artifacts) > 1:
        raise ValueError(f"--sha256 applies to a single model, not to {args.model}")
    retry = RetryPolicy(attempts=args.retries, timeout_s=args.timeout)
    for artifact in artifacts:
        try:
            path = download_artifact(
                artifact,
                args.checkpoint_dir,
                base_url=args.base_url,
                sha256=args.sha256,
                force=args.force,
                retry=retry,
                progress=not args.no_progress,
                max_expansion=args.max_expansion,
            )
        except (UserError, OSError) as error:
            raise UserError(f"{artifact.name}: {error}") from error
        say(f"{artifact.name}: ready")
        print_output(path)
    return 0
