"""CELLxGENE Discover datasets by species, through the public curation API (``/curation/v1/datasets``).

The API lists every public dataset with its organisms, assays, tissues, diseases, cell count, whether its cells
are primary data, and download assets. :func:`select_datasets` filters that list; :func:`download_datasets`
fetches the ``.h5ad`` asset of each selected dataset in parallel, resumably and with retries (see
:mod:`transcriptformer.hub.http`), into the layout of the original release::

    <output_path>/<dataset_id>/full.h5ad
    <output_path>/<dataset_id>/__success__      completion marker (JSON), written last
    <output_path>/dataset_metadata.json         API records of the selected datasets

A dataset with a marker is skipped by later runs. The API address can be changed with
``TRANSCRIPTFORMER_CELLXGENE_API`` (or ``api_url``).

What the API lists is not trusted blindly: a dataset id must be a plain name (letters, digits, ``.``, ``_``,
``-``), the asset an ``https://`` address (``http://`` only on this machine, ``localhost`` or a loopback address,
for a local mirror) with its size in bytes; the file must arrive with that size (and SHA-256, when the record
gives one, as ``sha256``) before the marker is written.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from filelock import FileLock, Timeout

from transcriptformer.hub.http import SHA256_HEX, DownloadError, RetryPolicy, download_file, fetch_json

logger = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.cellxgene.cziscience.com"
API_URL_ENV = "TRANSCRIPTFORMER_CELLXGENE_API"
DATASETS_ENDPOINT = "/curation/v1/datasets"
DATASET_FILE = "full.h5ad"
SUCCESS_MARKER = "__success__"
DOWNLOAD_LOCK = ".download.lock"  # held in a dataset's folder while one run downloads it
METADATA_FILE = "dataset_metadata.json"
WORKERS = 4  # parallel downloads
SAFE_DATASET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # matched whole (fullmatch)

Dataset = dict[str, Any]


@dataclass(frozen=True)
class DatasetFilter:
    """Which datasets to keep.

    Attributes
    ----------
    species : tuple of str
        Organism labels (``"homo sapiens"``, ``"Mus musculus"``, ``"mus_musculus"``) or ontology ids
        (``"NCBITaxon:9606"``), case-insensitive. Only single-organism datasets are kept, as in the original.
    assays, tissues, diseases : tuple of str
        When given, a dataset needs a label of each kind that contains one of these (case-insensitive).
    primary_only : bool
        Keep only datasets whose cells are all primary data (no cells duplicated from other datasets).
    min_cells, max_cells : int or None
        Bounds on the dataset's cell count.
    dataset_ids : tuple of str
        When given, only these datasets.
    """

    species: tuple[str, ...] = ()
    assays: tuple[str, ...] = ()
    tissues: tuple[str, ...] = ()
    diseases: tuple[str, ...] = ()
    primary_only: bool = True
    min_cells: int | None = None
    max_cells: int | None = None
    dataset_ids: tuple[str, ...] = ()

    def accepts(self, dataset: Dataset) -> bool:
        """Whether ``dataset`` (one record of the API) passes every criterion."""
        cells = dataset.get("cell_count") or 0
        return (
            self._species_match(dataset)
            and (not self.primary_only or is_primary(dataset))
            and _labels_match(dataset, "assay", self.assays)
            and _labels_match(dataset, "tissue", self.tissues)
            and _labels_match(dataset, "disease", self.diseases)
            and (self.min_cells is None or cells >= self.min_cells)
            and (self.max_cells is None or cells <= self.max_cells)
            and (not self.dataset_ids or dataset.get("dataset_id") in self.dataset_ids)
        )

    def _species_match(self, dataset: Dataset) -> bool:
        organisms = dataset.get("organism") or []
        if not self.species:
            return True
        if len(organisms) != 1:
            return False
        names = {_normalise_species(organisms[0].get("label", "")), organisms[0].get("ontology_term_id", "").lower()}
        return any(_normalise_species(s) in names for s in self.species)


@dataclass(frozen=True)
class DatasetOutcome:
    """What happened to one dataset.

    Attributes
    ----------
    dataset_id : str
    status : {"downloaded", "skipped", "failed"}
        ``skipped``: a previous run completed it.
    path : Path or None
        The ``.h5ad`` file, unless the download failed.
    error : str or None
        Why it failed.
    """

    dataset_id: str
    status: Literal["downloaded", "skipped", "failed"]
    path: Path | None = None
    error: str | None = None


def api_url(base: str | None = None) -> str:
    """The dataset index address: ``base``, else ``$TRANSCRIPTFORMER_CELLXGENE_API``, else the public API."""
    root = base or os.environ.get(API_URL_ENV) or DEFAULT_API_URL
    return root.rstrip("/") + DATASETS_ENDPOINT


def fetch_datasets(base: str | None = None, retry: RetryPolicy | None = None) -> list[Dataset]:
    """Every public dataset record of the curation API."""
    datasets = fetch_json(api_url(base), retry)
    if not isinstance(datasets, list):
        raise DownloadError(f"{api_url(base)} answered with {type(datasets).__name__}, expected a list of datasets")
    return datasets


def select_datasets(datasets: Iterable[Dataset], criteria: DatasetFilter, limit: int | None = None) -> list[Dataset]:
    """The datasets that pass ``criteria``, in API order, at most ``limit`` of them."""
    selected = [d for d in datasets if criteria.accepts(d)]
    return selected[:limit] if limit is not None else selected


def is_primary(dataset: Dataset) -> bool:
    """Whether every cell of the dataset is primary data (``is_primary_data`` is a list of flags in the API)."""
    flags = dataset.get("is_primary_data")
    flags = flags if isinstance(flags, list) else [flags]
    return bool(flags) and all(flag is True for flag in flags)


def h5ad_asset(dataset: Dataset) -> dict[str, Any] | None:
    """The ``H5AD`` download asset of a dataset (``url``, ``filesize``), if it has one."""
    assets = dataset.get("assets") or []
    return next((a for a in assets if str(a.get("filetype", "")).upper() == "H5AD" and a.get("url")), None)


def asset_problem(asset: dict[str, Any]) -> str | None:
    """Why an ``H5AD`` asset of the API cannot be downloaded safely, or ``None``.

    Its address must be ``https://`` (``http://`` only for this machine), its ``filesize`` a number of bytes,
    and its ``sha256``, when given, 64 hexadecimal digits.
    """
    url = str(asset["url"])
    parts = urlsplit(url)
    if parts.scheme != "https" and not (parts.scheme == "http" and _is_loopback(parts.hostname)):
        return f"{url} is not an https:// address"
    size = asset.get("filesize")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"its size {size!r} is not a number of bytes, so the download could not be verified"
    sha256 = asset.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and SHA256_HEX.fullmatch(sha256)):
        return f"its sha256 {sha256!r} is not 64 hexadecimal digits"
    return None


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def download_dataset(
    dataset: Dataset, output_path: str | Path, retry: RetryPolicy | None = None, progress: bool = False
) -> DatasetOutcome:
    """Download one dataset's ``.h5ad`` into ``output_path/<dataset_id>/``; never raises for a failed download."""
    dataset_id = str(dataset.get("dataset_id", ""))
    if not SAFE_DATASET_ID.fullmatch(dataset_id):
        return DatasetOutcome(dataset_id, "failed", error=f"refusing unsafe dataset id {dataset_id!r}")
    folder = Path(output_path) / dataset_id
    if (folder / SUCCESS_MARKER).exists():
        return DatasetOutcome(dataset_id, "skipped", folder / DATASET_FILE)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(folder / DOWNLOAD_LOCK, timeout=0):
            return _download_held(dataset, dataset_id, folder, retry, progress)
    except Timeout:
        return DatasetOutcome(dataset_id, "failed", error=f"{folder} is being downloaded by another run; wait for it")


def _download_held(
    dataset: Dataset, dataset_id: str, folder: Path, retry: RetryPolicy | None, progress: bool
) -> DatasetOutcome:
    """:func:`download_dataset` of a dataset whose folder this process holds."""
    if (folder / SUCCESS_MARKER).exists():  # another run finished it before this one took the lock
        return DatasetOutcome(dataset_id, "skipped", folder / DATASET_FILE)
    asset = h5ad_asset(dataset)
    if asset is None:
        return DatasetOutcome(dataset_id, "failed", error="the dataset has no H5AD asset")
    problem = asset_problem(asset)
    if problem:
        return DatasetOutcome(dataset_id, "failed", error=f"refusing the H5AD asset the API lists: {problem}")
    try:
        result = download_file(
            asset["url"],
            folder / DATASET_FILE,
            size=asset["filesize"],
            sha256=asset.get("sha256"),
            retry=retry,
            progress=progress,
            label=dataset_id,
        )
    except DownloadError as err:
        logger.error("dataset %s failed: %s", dataset_id, err)
        return DatasetOutcome(dataset_id, "failed", error=str(err))
    marker = {
        "dataset_id": dataset_id,
        "title": dataset.get("title"),
        "url": asset["url"],
        "bytes": result.size,
        "sha256": result.sha256,
        "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (folder / SUCCESS_MARKER).write_text(json.dumps(marker, indent=2))
    return DatasetOutcome(dataset_id, "downloaded", result.path)


def download_datasets(
    datasets: Sequence[Dataset],
    output_path: str | Path,
    *,
    workers: int = WORKERS,
    retry: RetryPolicy | None = None,
    save_metadata: bool = True,
    on_outcome: Callable[[DatasetOutcome], None] | None = None,
) -> list[DatasetOutcome]:
    """Download ``datasets`` with ``workers`` parallel threads.

    Parameters
    ----------
    datasets
        Records of the curation API (see :func:`select_datasets`).
    output_path
        Folder of the per-dataset folders.
    workers
        Parallel downloads.
    retry
        Retry policy of each download.
    save_metadata
        Write the records to ``output_path/dataset_metadata.json``.
    on_outcome
        Called (from a worker thread) as each dataset finishes.

    Returns
    -------
    list of DatasetOutcome
        In the order of ``datasets``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    output_path = Path(output_path)
    if output_path.exists() and not output_path.is_dir():
        raise NotADirectoryError(f"{output_path} is a file, not a folder: choose another output_path")
    output_path.mkdir(parents=True, exist_ok=True)
    if save_metadata:
        (output_path / METADATA_FILE).write_text(json.dumps(list(datasets), indent=2))

    def run_one(dataset: Dataset) -> DatasetOutcome:
        outcome = download_dataset(dataset, output_path, retry, progress=workers == 1)
        if on_outcome is not None:
            on_outcome(outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run_one, datasets))


def total_bytes(datasets: Iterable[Dataset]) -> int:
    """Sum of the ``.h5ad`` sizes the API reports (datasets without an ``H5AD`` asset count 0)."""
    return sum((h5ad_asset(d) or {}).get("filesize") or 0 for d in datasets)


def _normalise_species(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def _labels_match(dataset: Dataset, field: str, wanted: tuple[str, ...]) -> bool:
    if not wanted:
        return True
    labels = [str(item.get("label", "")).lower() for item in dataset.get(field) or []]
    return any(w.lower() in label for w in wanted for label in labels)
