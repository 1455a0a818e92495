"""``transcriptformer annotate``: label query cells from a labelled reference (docs/annotate.md).

The reference is a file (``--reference``), the cells of a SOMA experiment (``--reference-soma``) or of the
CELLxGENE Census (``--reference-census``), selected by ``--organism`` and ``--obs-filter``, or a saved index
(``--index``); the query is ``--data-file``. Cells are embedded by the checkpoint through the engine (the query as
the engine's rows, resumable; the reference in memory, a SOMA reference streamed as ``inference --soma`` reads it),
read from a SOMA array of the reference's embeddings (``--reference-embeddings``), or taken from ``obsm``
(``--obsm-key``: no checkpoint). The labels and the summary are written as ``annotated.h5ad`` with the
summary table and figures beside it, in one atomic write.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transcriptformer.annotation.settings import METRICS, AnnotateConfig
from transcriptformer.cli.common import add_run_arguments, positive_int, run_config_from_args, run_task
from transcriptformer.console import print_output
from transcriptformer.errors import UserError
from transcriptformer.tasks.annotate import AnnotateTaskConfig

if TYPE_CHECKING:
    import anndata as ad
    import numpy as np
    import pandas as pd

    from transcriptformer.annotation import ReferenceIndex
    from transcriptformer.engine.config import RunConfig

EXAMPLES = """\
examples:
  # a labelled reference and a query, both embedded by the checkpoint; the index kept for later queries
  transcriptformer annotate --checkpoint-path models/demo-mouse-brain --reference reference.h5ad \\
      --label-key cell_type --data-file query.h5ad --output-path annotated --save-index brain_index

  # the cells of a SOMA experiment (or --reference-census stable --organism ...) as reference, embedded once
  transcriptformer annotate --checkpoint-path models/demo-mouse-brain --reference-soma reference_soma \
      --obs-filter "cell_type != 'unknown'" --label-key cell_type --data-file query.h5ad --save-index soma_index

  # more query cells against the saved index (embedded by the index's checkpoint)
  transcriptformer annotate --checkpoint-path models/demo-mouse-brain --index brain_index \\
      --data-file more_cells.h5ad --output-path annotated_more

  # embeddings already in both files' obsm (another model, PCA): no checkpoint
  transcriptformer annotate --reference reference.h5ad --label-key cell_type --data-file query.h5ad \\
      --obsm-key X_pca --true-key cell_type --output-path annotated_pca

  # a reference of another species: its own gene-embedding table
  transcriptformer annotate --checkpoint-path CKPT --reference mouse.h5ad --label-key cell_type \\
      --reference-pretrained-embedding mus_musculus_gene.h5 --data-file human.h5ad \\
      --pretrained-embedding homo_sapiens_gene.h5

documentation: docs/annotate.md
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``annotate``; defaults: :class:`AnnotateTaskConfig`'s and :class:`AnnotateConfig`'."""
    task = AnnotateTaskConfig()
    parser.description = (
        "Label the cells of one or more files from a labelled reference: each query cell takes the label its "
        "nearest reference cells vote for, with a confidence, or Unknown below a threshold chosen on the reference. "
        "Writes the query as one .h5ad with predicted_<key> and <key>_confidence, a summary and figures."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_run_arguments(parser, task.run_defaults(), checkpoint_required=False)
    reference = parser.add_argument_group("the reference")
    source = reference.add_mutually_exclusive_group(required=True)
    source.add_argument("--reference", metavar="FILE", help="labelled reference cells: .h5ad, .zarr or 10x .h5")
    source.add_argument(
        "--reference-soma",
        metavar="URI",
        help="or a SOMA experiment's cells, selected by --obs-filter and --organism",
    )
    source.add_argument(
        "--reference-census",
        metavar="VERSION",
        help="or the cells of the public CELLxGENE Census of this version (e.g. stable; needs the network), selected "
        "by --organism and --obs-filter",
    )
    source.add_argument("--index", metavar="DIR", help="or a reference index saved by --save-index")
    reference.add_argument(
        "--reference-embeddings",
        metavar="URI",
        help="the SOMA array of the SOMA reference's embeddings (inference --output-soma), by soma_joinid; "
        "without it the checkpoint embeds them",
    )
    reference.add_argument(
        "--label-key",
        nargs="+",
        metavar="KEY",
        help="reference obs column(s) of labels to transfer (default with --index: the index's)",
    )
    reference.add_argument("--save-index", metavar="DIR", help="save the reference index to this new folder")
    reference.add_argument(
        "--reference-pretrained-embedding",
        nargs="+",
        metavar="H5",
        help="gene-embedding file(s) of the reference's species (as --pretrained-embedding for the query)",
    )
    precomputed = parser.add_argument_group("precomputed embeddings (no checkpoint)")
    precomputed.add_argument("--obsm-key", metavar="KEY", help="the embeddings in both files' obsm")
    precomputed.add_argument("--reference-obsm", metavar="KEY", help="the reference's obsm key (default: --obsm-key)")
    precomputed.add_argument("--query-obsm", metavar="KEY", help="the query's obsm key (default: --obsm-key)")
    labels = parser.add_argument_group("label transfer (docs/annotate.md)")
    labels.add_argument(
        "--n-neighbors",
        type=positive_int,
        default=AnnotateConfig.n_neighbors,
        help="reference cells voting for each query cell (default: %(default)s)",
    )
    labels.add_argument("--metric", choices=METRICS, default=AnnotateConfig.metric, help="(default: %(default)s)")
    labels.add_argument(
        "--reject",
        action=argparse.BooleanOptionalAction,
        default=task.reject,
        help="call Unknown the cells below the threshold chosen on the reference (default: %(default)s)",
    )
    labels.add_argument(
        "--false-unknown-rate",
        type=float,
        default=AnnotateConfig.false_unknown_rate,
        help="share of held-out, correctly labelled reference cells that the threshold calls Unknown "
        "(default: %(default)s)",
    )
    labels.add_argument(
        "--true-key",
        metavar="COLUMN",
        help="query obs column of true labels: macro F1, accuracy and a confusion matrix of the first label key",
    )
    labels.add_argument(
        "--figures",
        action=argparse.BooleanOptionalAction,
        default=task.figures,
        help="write the joint UMAP (and confusion matrix) beside the output (default: %(default)s)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``transcriptformer annotate``; returns the exit code."""
    check_arguments(args)
    check_query_columns(args)
    settings = AnnotateConfig(
        n_neighbors=args.n_neighbors, metric=args.metric, false_unknown_rate=args.false_unknown_rate
    )
    reference_filter = (None, None)
    if soma_reference(args):  # they select the reference's cells, not the query's
        reference_filter = (args.organism, args.obs_filter)
        args.organism = args.obs_filter = None
    config = None if precomputed(args) else run_config_from_args(args)
    if args.dry_run and not args.index:
        return dry_run(args, config, reference_filter)
    with contextlib.ExitStack() as stack:
        index, index_dir = reference_index(args, settings, config, reference_filter, stack)
        task_settings = AnnotateTaskConfig(
            label_keys=index.label_keys,
            reject=args.reject,
            true_key=args.true_key,
            figures=args.figures,
            index_id=index_identity(index_dir),
            output_filename=args.output_filename,
        )
        from transcriptformer.tasks.annotate import AnnotateTask

        task = AnnotateTask(settings=task_settings, index_dir=str(index_dir), reference=index)
        if config is None:
            annotate_precomputed(task, args)
        else:
            run_task(task, config, dry_run=args.dry_run)
    return 0


def dry_run(args: argparse.Namespace, config: RunConfig | None, soma_filter: tuple[str | None, str | None]) -> int:
    """Check the reference's labels and (from a checkpoint) the query's run and print its plan; embed nothing."""
    from transcriptformer.tasks.annotate import AnnotateTask

    obs = reference_obs(args, soma_filter)
    check_labels(obs, args.label_key)
    print(f"Reference: {len(obs)} cells, label keys {', '.join(args.label_key)}")
    if config is not None:
        run_task(AnnotateTask(settings=AnnotateTaskConfig(label_keys=args.label_key)), config, dry_run=True)
    return 0


def precomputed(args: argparse.Namespace) -> bool:
    """Whether the embeddings are read from obsm instead of computed."""
    return bool(args.obsm_key or args.reference_obsm or args.query_obsm)


def soma_reference(args: argparse.Namespace) -> bool:
    """Whether the reference's cells are those of a SOMA experiment or of the Census."""
    return bool(args.reference_soma or args.reference_census)


def check_query_columns(args: argparse.Namespace) -> None:
    """The query files hold the ``--true-key`` column: checked before the reference or the query is embedded."""
    from transcriptformer.data.sources import read_obs
    from transcriptformer.tasks.annotate import check_true_key

    for path in args.data_files if args.true_key else ():
        try:
            check_true_key(args.true_key, read_obs(path).columns)
        except ValueError as error:
            raise UserError(str(error)) from None


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse combinations of flags that cannot run, before anything is read."""
    if precomputed(args):
        if args.checkpoint_path:
            raise UserError("--obsm-key reads embeddings already computed: drop --checkpoint-path, or --obsm-key")
        if not args.data_files:
            raise UserError("--obsm-key reads the query's obsm: give the query as --data-file")
        if len(args.data_files) > 1:
            raise UserError("--obsm-key reads one query file: give one --data-file")
        if args.reference_census or args.reference_soma:
            if not args.reference_embeddings:
                raise UserError("--obsm-key: give --reference-embeddings for a SOMA reference, or --checkpoint-path")
        elif not args.index and not (args.reference_obsm or args.obsm_key):
            raise UserError("give --obsm-key (both files) or --reference-obsm for the reference's embeddings")
        if not args.query_obsm and not args.obsm_key:
            raise UserError("give --obsm-key (both files) or --query-obsm for the query's embeddings")
    elif not args.checkpoint_path:
        raise UserError("give --checkpoint-path to embed the cells, or --obsm-key for embeddings already in obsm")
    if not args.index and not args.label_key:
        raise UserError("give --label-key: the reference obs column(s) of labels to transfer")
    if args.reference_embeddings and not soma_reference(args):
        raise UserError(
            "--reference-embeddings are those of a SOMA reference: give --reference-soma or --reference-census"
        )
    if args.save_index and Path(args.save_index).is_file():
        raise UserError(f"--save-index {args.save_index} is a file; give a new folder for the index")
    if args.save_index and Path(args.save_index).exists() and any(Path(args.save_index).iterdir()):
        raise UserError(f"--save-index {args.save_index} exists and is not empty; choose a new folder or remove it")
    if args.reference_pretrained_embedding and (args.index or precomputed(args)):
        raise UserError("--reference-pretrained-embedding embeds the reference: drop it with --index or --obsm-key")


def reference_index(
    args: argparse.Namespace,
    settings: AnnotateConfig,
    config: RunConfig | None,
    soma_filter: tuple[str | None, str | None],
    stack: contextlib.ExitStack,
) -> tuple[ReferenceIndex, Path]:
    """The reference index and its folder: loaded, or built (labels checked first) and saved."""
    from transcriptformer.annotation import ReferenceIndex

    if args.index:
        index = ReferenceIndex.load(args.index)
        missing = [key for key in args.label_key or [] if key not in index.label_keys]
        if missing:
            raise UserError(f"--label-key {', '.join(missing)}: the index at {args.index} has {index.label_keys}")
        if args.label_key:
            index.labels = [table for table in index.labels if table.key in args.label_key]
        if config is not None:
            index.check_model(model_id_of(config))  # before any compute
        return index, Path(args.index)
    obs = reference_obs(args, soma_filter)
    check_labels(obs, args.label_key)
    embeddings, obs, model_id = reference_embeddings(args, obs, config, soma_filter)
    index = ReferenceIndex.build(embeddings, obs, args.label_key, model_id=model_id, settings=settings)
    folder = args.save_index or stack.enter_context(tempfile.TemporaryDirectory(prefix="transcriptformer-index-"))
    index.save(folder)
    if args.save_index:
        print(f"Saved the reference index ({index.n_cells} cells) to {Path(folder).resolve()}", flush=True)
    return index, Path(folder)


def index_identity(folder: Path) -> str:
    """The SHA-256 of the index's manifest, which holds those of its files."""
    from transcriptformer.safe_load import sha256_of

    return sha256_of(folder / "manifest.json")


def model_id_of(config: RunConfig) -> str:
    """The SHA-256 of the checkpoint's weights, as the engine records it."""
    from transcriptformer.checkpoint import WEIGHTS_FILE
    from transcriptformer.safe_load import sha256_of

    return sha256_of(Path(config.model.checkpoint_path) / WEIGHTS_FILE)


def check_labels(obs: pd.DataFrame, label_keys: list[str]) -> None:
    """Label keys missing or all NaN, a class named Unknown: one line before any compute (warnings come later)."""
    from transcriptformer.annotation.labels import encode_labels, label_columns

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the index build warns once, about small classes and unlabelled cells
        for key, column in label_columns(obs, label_keys, len(obs)).items():
            encode_labels(key, column)


def reference_obs(args: argparse.Namespace, soma_filter: tuple[str | None, str | None]) -> pd.DataFrame:
    """The reference cells' obs (with its labels), read without the counts."""
    if soma_reference(args):
        with soma_reader(args, soma_filter) as reader:
            return reader.read_obs().copy()
    from transcriptformer.data.sources import read_obs

    return read_obs(args.reference)


def soma_reader(args: argparse.Namespace, soma_filter: tuple[str | None, str | None]) -> Any:
    """The reference cells of the SOMA experiment ``--reference-soma`` (or of the Census)."""
    from transcriptformer.data.soma import SomaReader

    organism, obs_filter = soma_filter
    return SomaReader(
        args.reference_soma,
        organism,
        obs_filter,
        args.soma_measurement,
        args.soma_x_layer,
        census_version=args.reference_census,
    )


def reference_embeddings(
    args: argparse.Namespace, obs: pd.DataFrame, config: RunConfig | None, soma_filter: tuple[str | None, str | None]
) -> tuple[np.ndarray, pd.DataFrame, str | None]:
    """The reference's embeddings, its obs row for each, and the id of the model that computed them."""
    if soma_reference(args) and args.reference_embeddings:
        from transcriptformer.annotation.soma import read_soma_embeddings

        with soma_reader(args, soma_filter) as reader:
            joinids = reader.joinids()
        embeddings, model_id = read_soma_embeddings(args.reference_embeddings, joinids)
        return embeddings, obs, model_id
    if config is None:
        embeddings, model_id = read_obsm(args.reference, args.reference_obsm or args.obsm_key, "--reference")
        return embeddings, obs, model_id
    return embed_reference(args, obs, config, soma_filter)


def embed_reference(
    args: argparse.Namespace, obs: pd.DataFrame, config: RunConfig, soma_filter: tuple[str | None, str | None]
) -> tuple[np.ndarray, pd.DataFrame, str]:
    """The reference cells embedded by the engine in memory, with the reference's own gene table when given.

    The cells of a SOMA reference are read as ``inference --soma`` reads them: those of the filter, a unit at a
    time, their gene ids in var ``feature_id`` unless ``--gene-col-name`` names another column.
    """
    from transcriptformer.console import say
    from transcriptformer.engine.run import run_in_memory
    from transcriptformer.engine.session import load_for_run
    from transcriptformer.runtime import resolve_device
    from transcriptformer.tasks.embed import EmbedConfig, EmbedTask

    settings = dict(pretrained_embedding=args.reference_pretrained_embedding, output_keys=["embeddings"])
    if soma_reference(args):
        organism, obs_filter = soma_filter
        settings |= dict(
            data_files=[],
            soma=args.reference_soma,
            census_version=args.reference_census,
            organism=organism,
            obs_filter=obs_filter,
        )
        data, source = None, args.reference_soma or f"the CELLxGENE Census {args.reference_census}"
    else:
        settings |= dict(data_files=[args.reference])
        data, source = args.reference, args.reference
    reference_config = config.replace(**settings)
    device = resolve_device(reference_config.hardware.device)
    say(f"Embedding the {len(obs)} reference cells of {source} on {device.type}")
    checkpoint = load_for_run(reference_config, device)
    result = run_in_memory(EmbedTask(settings=EmbedConfig(None)), checkpoint, data, reference_config, device)
    if len(result.obs) != len(obs):  # cells left out by the cell filters (--drop-empty-cells)
        obs = obs.set_axis(obs.index.astype(str)).loc[result.obs.index]
    return result.outputs.cell_values["embeddings"], obs, model_id_of(config)


def read_obsm(path: str, key: str, flag: str) -> tuple[np.ndarray, str | None]:
    """``obsm[key]`` of an ``.h5ad`` or ``.zarr`` file, and the id of the model that wrote it (when recorded)."""
    import numpy as np

    adata = read_annotated(path, flag)
    key = obsm_key_of_file(adata, key, f"{flag} {path}")
    return np.asarray(adata.obsm[key]), recorded_model_id(adata.uns)


def obsm_key_of_file(adata: ad.AnnData, key: str, name: str) -> str:
    """The obsm key of ``adata`` that holds ``key``'s embeddings (``X_transcriptformer`` and ``embeddings`` alike).

    ``name`` names the file (its flag and path) in the error when it has none.
    """
    from transcriptformer.engine.output import stored_obsm_key

    stored = stored_obsm_key(adata.obsm, key)
    if stored is None:
        raise UserError(f"{name} has no obsm[{key!r}]; it has {', '.join(adata.obsm) or 'none'}")
    return stored


def read_annotated(path: str, flag: str) -> Any:
    """An ``.h5ad`` or ``.zarr`` file as an AnnData (its obsm and obs in memory)."""
    import anndata as ad

    if path.endswith(".zarr"):
        return ad.read_zarr(path)
    if not path.endswith(".h5ad"):
        raise UserError(f"{flag} {path}: obsm is read from an .h5ad or .zarr file")
    return ad.read_h5ad(path)


def recorded_model_id(uns: Any) -> str | None:
    """The weights' SHA-256 that ``transcriptformer inference`` records in ``uns["transcriptformer"]``."""
    record = uns.get("transcriptformer", {})
    model_id = record.get("weights_sha256") if hasattr(record, "get") else None
    return str(model_id) if model_id else None


def annotate_precomputed(task: Any, args: argparse.Namespace) -> None:
    """Label the query's ``obsm`` embeddings and write it with the task's files, under the output's lock."""
    from transcriptformer.engine.config import output_file_name
    from transcriptformer.engine.output import claim_output, remove_stale_temporaries, write_anndata
    from transcriptformer.tasks.annotate import annotate_embeddings

    path = Path(args.output_path) / output_file_name(args.output_filename)
    with claim_output(path, args.overwrite, beside=task.output_files()):
        for stale in remove_stale_temporaries(path):
            print(f"Removed {stale}, left by a run killed while writing the output", flush=True)
        query = read_annotated(args.data_files[0], "--data-file")
        key = obsm_key_of_file(query, args.query_obsm or args.obsm_key, f"--data-file {args.data_files[0]}")
        taken = [column for column in task.added_obs_columns() if column in query.obs]
        if taken:
            raise UserError(f"--data-file {args.data_files[0]} already has obs {taken}; remove them or rename them")
        uns = annotate_embeddings(task, query.obs, query.obsm[key], recorded_model_id(query.uns))
        query.uns.update(uns)
        write_anndata(query, path, (task.output_files(), lambda folder: task.write_files(folder, query.obs, uns)))
    for line in task.describe(uns):
        print(line, flush=True)
    print_output(path)
