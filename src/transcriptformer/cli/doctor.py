"""``transcriptformer doctor``: check Python, torch, the GPU and FlexAttention; suggest batch sizes."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``doctor``."""
    parser.description = (
        "Check Python, the torch build against this machine's GPU, torch/torchvision/torchaudio "
        "consistency and FlexAttention, and suggest a batch size for each published model. Exits with code 1 "
        "when it finds a problem, and prints the command that fixes it."
    )
    parser.epilog = "documentation: docs/environment.md"
    parser.add_argument(
        "--skip-flex", action="store_true", help="do not compile FlexAttention (the slowest check, on CUDA)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the report; exit code 1 when a problem was found."""
    from transcriptformer.doctor import format_findings, run_doctor

    findings, code = run_doctor(check_flex=not args.skip_flex)
    print(format_findings(findings))
    return code
