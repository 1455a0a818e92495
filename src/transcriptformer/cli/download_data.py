"""``transcriptformer download-data``: CELLxGENE Discover datasets by species."""

from __future__ import annotations

import argparse
import sys

from transcriptformer.cli.common import add_hidden_alias, positive_int
from transcriptformer.console import print_output, say
from transcriptformer.hub.cellxgene import (
    API_URL_ENV,
    WORKERS,
    DatasetFilter,
    DatasetOutcome,
    download_datasets,
    fetch_datasets,
    select_datasets,
    total_bytes,
)
from transcriptformer.hub.http import DownloadError, RetryPolicy

EXAMPLES = f"""\
examples:
  transcriptformer download-data --species "homo sapiens" --assay "10x 3' v3" --tissue lung --dry-run
  transcriptformer download-data --species "mus musculus,homo sapiens" --min-cells 1000 --limit 20 --workers 8

Each dataset goes to OUTPUT_DIR/<dataset_id>/full.h5ad; a dataset finished by an earlier run is skipped, an
interrupted one resumes. The API address can be set with ${API_URL_ENV}.

documentation: docs/downloads.md
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``download-data``."""
    parser.description = "Download the .h5ad files of CELLxGENE Discover datasets, selected by species and filters."
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    select = parser.add_argument_group("which datasets")
    select.add_argument(
        "--species",
        required=True,
        help="comma-separated organisms, e.g. 'homo sapiens,mus musculus' or NCBITaxon:9606 (required)",
    )
    select.add_argument("--assay", action="append", default=[], help="keep datasets with an assay containing this")
    select.add_argument("--tissue", action="append", default=[], help="keep datasets with a tissue containing this")
    select.add_argument("--disease", action="append", default=[], help="keep datasets with a disease containing this")
    select.add_argument("--min-cells", type=int, default=None, help="keep datasets with at least this many cells")
    select.add_argument("--max-cells", type=int, default=None, help="keep datasets with at most this many cells")
    select.add_argument("--dataset-id", action="append", default=[], help="keep only this dataset (repeatable)")
    select.add_argument(
        "--include-non-primary",
        action="store_true",
        help="also keep datasets with cells duplicated from other datasets (default: primary data only)",
    )
    select.add_argument("--limit", type=int, default=None, help="download at most this many datasets")
    run_opts = parser.add_argument_group("how")
    output = run_opts.add_argument(
        "--output-path", default="./data/cellxgene", help="destination folder (default: %(default)s)"
    )
    add_hidden_alias(run_opts, "--output-dir", output)
    run_opts.add_argument(
        "--workers",
        "--processes",
        type=positive_int,
        default=WORKERS,
        help="parallel downloads (default: %(default)s)",
        dest="workers",
    )
    run_opts.add_argument(
        "--max-retries",
        type=positive_int,
        default=RetryPolicy.attempts,
        help="attempts per dataset (default: %(default)s)",
    )
    run_opts.add_argument("--api-url", default=None, help=f"curation API root (${API_URL_ENV}, else the public API)")
    run_opts.add_argument("--no-metadata", action="store_true", help="do not write dataset_metadata.json")
    run_opts.add_argument(
        "--dry-run",
        "--test-only",
        action="store_true",
        dest="dry_run",
        help="list the selected datasets and their total size; download nothing",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Select and download; exit code 1 when the API is unreachable or any dataset failed."""
    criteria = DatasetFilter(
        species=tuple(s.strip() for s in args.species.split(",") if s.strip()),
        assays=tuple(args.assay),
        tissues=tuple(args.tissue),
        diseases=tuple(args.disease),
        primary_only=not args.include_non_primary,
        min_cells=args.min_cells,
        max_cells=args.max_cells,
        dataset_ids=tuple(args.dataset_id),
    )
    retry = RetryPolicy(attempts=args.max_retries)
    try:
        available = fetch_datasets(args.api_url, retry)
    except DownloadError as err:
        raise DownloadError(f"cannot list CELLxGENE datasets: {err}") from None
    selected = select_datasets(available, criteria, args.limit)
    (print if args.dry_run else say)(  # the selection is the result of a dry run
        f"{len(selected)} of {len(available)} datasets selected, {total_bytes(selected) / 1e9:.2f} GB "
        f"({criteria.species})"
    )
    if args.dry_run or not selected:
        for dataset in selected:
            print(f"  {dataset['dataset_id']}  {dataset.get('cell_count', '?'):>9} cells  {dataset.get('title', '')}")
        return 0
    outcomes = download_datasets(
        selected,
        args.output_path,
        workers=args.workers,
        retry=retry,
        save_metadata=not args.no_metadata,
        on_outcome=_print,
    )
    failed = [o for o in outcomes if o.status == "failed"]
    done = len(outcomes) - len(failed)
    failures = f"; {len(failed)} failed" if failed else ""
    print(f"{done} of {len(outcomes)} datasets ready{failures}")
    print_output(args.output_path)
    return 1 if failed else 0


def _print(outcome: DatasetOutcome) -> None:
    if outcome.error:
        print(f"  {outcome.status:>10}  {outcome.dataset_id}  {outcome.error}", file=sys.stderr)
    else:
        say(f"  {outcome.status:>10}  {outcome.dataset_id}  {outcome.path}")
