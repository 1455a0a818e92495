"""Typed settings of a run through the engine, one dataclass per concern, and Hydra-style overrides on them.

The settings form one tree::

    model:       ModelRunConfig    checkpoint_path, model_type, adapter, pretrained_embedding
      data_config:    transcriptformer.config.DataConfig   (gene_col_name, clip_counts, normalize_to_scale, ...)
      model_config:   transcriptformer.config.ModelConfig
      loss_config:    transcriptformer.config.LossConfig
    input:       InputConfig       which cells: data_files or a SOMA experiment, use_raw, ...
    output:      OutputConfig      where and what to write: output_path, output_filename, obs_keys, resume, ...
    predict:     transcriptformer.config.PredictConfig     the batch loop: output_keys, batch_size, precision, ...
    hardware:    HardwareConfig    device, num_gpus, n_data_workers, attention_backend

Every setting has one name across the tree (a flag's, an API keyword's), so :meth:`RunConfig.replace` takes them
flat (``batch_size=16``). The original release kept the settings of a run under ``model.inference_config``; its
override keys (``model.inference_config.batch_size``) still set them (:data:`FORMER_KEYS`).
:func:`apply_overrides` parses ``key=value`` strings with Hydra's override grammar (lists, ``null``, quoted strings)
and sets them through OmegaConf, which checks every key and type against the dataclasses. This module imports
neither Hydra nor torch until an override is applied, so that the command line starts fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transcriptformer.config import (
    CONFIG_FILE,
    SOMA_BLOCK_CELLS,
    DataConfig,
    LossConfig,
    ModelConfig,
    PredictConfig,
    TranscriptFormerConfig,
    check_range,
)
from transcriptformer.model.outputs import check_output_keys
from transcriptformer.runtime import BACKENDS, DEVICES

MODEL_TYPES = ("transcriptformer", "esm2ce")
EMB_TYPES = ("cell", "cge")
ALL_OBS_KEYS = "all"
# What a run writes: the .h5ad, a SOMA array of cell embeddings (at output_soma), or both.
OUTPUT_FORMATS = ("h5ad", "soma", "both")
# The output convention of every command. The cell embeddings (the model output "embeddings") go to obsm under
# EMBEDDING_KEY, from the command line and the Python API alike (scanpy's use_rep, cellxgene's X_<name>); an .h5ad
# written from files also holds them as EMBEDDING_ALIAS, the original release's key (a hard link: stored once).
EMBEDDING_KEY, EMBEDDING_ALIAS = "X_transcriptformer", "embeddings"
COUNTS_LAYER = "counts"  # with keep_counts: the input's counts, also X (stored once)


def output_file_name(name: str) -> str:
    """The one rule for output file names: ``name``, with ``.h5ad`` appended when it does not end so."""
    return name if name.endswith(".h5ad") else f"{name}.h5ad"


def default_output_path(command: str) -> str:
    """The one rule for default output folders: ``./<command>_results`` (``-`` as ``_``), a folder per command."""
    return f"./{command.replace('-', '_')}_results"


@dataclass
class InputConfig:
    """Which cells a run reads, and how.

    Attributes
    ----------
    data_files : list of str
        Input ``.h5ad`` files; their cells are concatenated in this order.
    soma : str or None
        Instead of files: a TileDB-SOMA experiment, or a collection of them such as a copy of the CELLxGENE
        Census, as a folder or URI (``s3://``). Its gene ids are read from var ``feature_id`` on the command line
        (set ``model.data_config.gene_col_name`` in Python).
    census_version : str or None
        Instead of files: the public CELLxGENE Census of this version (needs the network and cellxgene-census).
    organism : str or None
        The experiment of a Census (``homo_sapiens`` or ``"Homo sapiens"``); for an experiment, its organism as
        recorded with the output.
    obs_filter : str or None
        A SOMA value filter selecting the cells, e.g. ``"tissue_general == 'lung' and is_primary_data == True"``;
        ``None``: every cell. Of an experiment, cells run in ascending ``soma_joinid`` order; of files, the same
        language selects cells by their obs (:func:`~transcriptformer.data.soma.obs_filter_rows`).
    soma_measurement, soma_x_layer : str
        The experiment's measurement and its X layer of raw counts.
    soma_block_cells : int
        Cells of the query per block of its obs (joinids, names, the columns read) read at a time: memory holds two
        blocks, whatever the size of the query.
    use_raw : bool or None
        Counts from ``adata.raw.X`` (True), ``adata.X`` (False), or ``raw`` when present (None).
    remove_duplicate_genes : bool
        Keep the first of duplicated gene ids instead of stopping with an error.
    use_oom_dataloader : bool
        The original release's switch to its streaming data loader (``--oom-dataloader``). Every run streams its
        cells from disk in chunks here, so it changes nothing; it is accepted so that the original's commands and
        configs keep working.
    """

    data_files: list[str] = field(default_factory=list)
    soma: str | None = None
    census_version: str | None = None
    organism: str | None = None
    obs_filter: str | None = None
    soma_measurement: str = "RNA"
    soma_x_layer: str = "raw"
    soma_block_cells: int = SOMA_BLOCK_CELLS
    use_raw: bool | None = None
    remove_duplicate_genes: bool = False
    use_oom_dataloader: bool = False

    def __post_init__(self) -> None:
        check_range(self, "", "soma_block_cells", at_least=1)
        given = [name for name in ("data_files", "soma", "census_version") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are alternatives: read the cells from one of them")
        if self.census_version and not self.organism:
            raise ValueError("census_version: the Census holds one experiment per organism; choose one with `organism`")
        if self.organism and not self.reads_soma:
            raise ValueError("`organism` selects the experiment of a Census: give `soma` or census_version")

    @property
    def reads_soma(self) -> bool:
        """Whether the cells come from a SOMA experiment (``soma`` or ``census_version``)."""
        return bool(self.soma or self.census_version)


@dataclass
class OutputConfig:
    """Where a run writes, what it keeps of the inputs, and how it saves its work.

    Attributes
    ----------
    output_path, output_filename : str
        The output file is ``output_path / output_filename``; the saved units of a run wait beside it (a folder
        that every process can write to).
    output_format : str or None
        ``h5ad``, ``soma`` (cell embeddings into a SOMA array at ``output_soma``, no ``.h5ad``) or ``both``;
        ``None``: ``soma`` when ``output_soma`` is given, else ``h5ad``.
    output_soma : str or None
        Folder or URI of the SOMA array of cell embeddings, indexed by the input's ``soma_joinid``, as the Census
        stores its hosted embeddings.
    keep_counts : bool
        Write the outputs into a copy of the input: ``X`` the counts read (all the input's genes, its var), per-gene
        outputs as layers on those genes (0 for genes the vocabulary lacks), for tasks whose rows are the input
        cells; one input file.
    obs_keys : list of str
        ``obs`` columns to keep; ``["all"]`` keeps every column.
    emb_type : str
        ``"cell"``, or ``"cge"`` to also write contextual gene embeddings (the original release's flag: ``cge``
        is then added to ``output_keys``).
    chunk_size : int
        Cells per unit of work; each unit's outputs are saved to disk when it is done (what ``resume`` keeps).
    overwrite : bool
        Replace an existing output file.
    resume : bool
        Continue an interrupted run with the same settings: units whose outputs were saved are not run again.
    """

    output_path: str = default_output_path("inference")
    output_filename: str = "embeddings.h5ad"
    output_format: str | None = None
    output_soma: str | None = None
    keep_counts: bool = False
    obs_keys: list[str] = field(default_factory=lambda: [ALL_OBS_KEYS])
    emb_type: str = "cell"
    chunk_size: int = 1024
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        _check_choices("emb_type", [self.emb_type], EMB_TYPES)
        check_range(self, "", "chunk_size", at_least=1)
        if self.output_filename in ("", ".", "..") or Path(self.output_filename).name != self.output_filename:
            raise ValueError(
                f"output_filename {self.output_filename!r} is not a file name: give the folder as output_path and "
                "a name without '/' as output_filename"
            )
        if not self.obs_keys:
            raise ValueError(f"obs_keys is empty: list columns, or [{ALL_OBS_KEYS}] for every column")
        repeated = sorted({key for key in self.obs_keys if self.obs_keys.count(key) > 1})
        if repeated:
            raise ValueError(f"obs_keys names {repeated} more than once; list each column once")
        if self.output_format is not None:
            _check_choices("output_format", [self.output_format], OUTPUT_FORMATS)
        if not self.writes_soma and self.output_soma:
            raise ValueError(f"output_soma is written when output_format is soma or both, not {self.output_format}")
        if self.writes_soma and not self.output_soma:
            raise ValueError(f"`output_format={self.output_format}` writes a SOMA array: give its URI with output_soma")

    @property
    def resolved_output_format(self) -> str:
        """``output_format``, or its default: ``soma`` when ``output_soma`` is given, else ``h5ad``."""
        return self.output_format or ("soma" if self.output_soma else "h5ad")

    @property
    def writes_h5ad(self) -> bool:
        """Whether the run writes the ``.h5ad``."""
        return self.resolved_output_format != "soma"

    @property
    def writes_soma(self) -> bool:
        """Whether the run writes the SOMA array of cell embeddings."""
        return self.resolved_output_format != "h5ad"


@dataclass
class HardwareConfig:
    """Where and in how many processes a run computes.

    Attributes
    ----------
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    num_gpus : int
        Worker processes, one per GPU; ``-1``: every visible GPU. On CPU: the number of CPU processes.
    n_data_workers : int
        Threads that read and tokenize the next units of cells while the model runs, per process (0: none).
    attention_backend : str
        One of :data:`transcriptformer.runtime.BACKENDS`; ``auto`` picks flex on CUDA, chunked elsewhere.
    """

    device: str = "auto"
    num_gpus: int = 1
    n_data_workers: int = 0
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        _check_choices("device", [self.device], DEVICES)
        _check_choices("attention_backend", [self.attention_backend], BACKENDS)
        if self.num_gpus != -1:
            check_range(self, "", "num_gpus", at_least=1, also="or -1: every visible GPU")
        check_range(self, "", "n_data_workers", at_least=0)


@dataclass
class ModelRunConfig:
    """The ``model`` node: the checkpoint, the model family, what changes its weights, and its settings.

    Attributes
    ----------
    checkpoint_path : str
        The checkpoint directory.
    model_type : str
        ``transcriptformer``, or ``esm2ce``: the mean of the cell's raw gene-embedding rows, no transformer.
    adapter : str or None
        LoRA adapter directory merged into the weights.
    pretrained_embedding : list of str
        Gene-embedding files that replace the model's own table (out-of-distribution species).
    data_config, model_config, loss_config
        The checkpoint's settings (``config.json``), as the run changes them.
    """

    checkpoint_path: str = ""
    model_type: str = "transcriptformer"
    adapter: str | None = None
    pretrained_embedding: list[str] = field(default_factory=list)
    data_config: DataConfig = field(default_factory=DataConfig)
    model_config: ModelConfig = field(default_factory=ModelConfig)
    loss_config: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        _check_choices("model_type", [self.model_type], MODEL_TYPES)


# The sections of a run's settings below the model: node name -> its dataclass.
SECTIONS = {"input": InputConfig, "output": OutputConfig, "predict": PredictConfig, "hardware": HardwareConfig}
# The node of each setting that a command sets by a flag or the API by a keyword: its name is the field's.
SECTION_OF = {item.name: name for name, cls in SECTIONS.items() for item in dataclasses.fields(cls)} | {
    name: "model" for name in ("model_type", "adapter", "pretrained_embedding")
}
# Former keys of the original release's settings tree, which overrides may still use: former prefix -> current.
FORMER_KEYS = {
    f"model.inference_config.{name}": f"{section}.{name}"
    for name, section in SECTION_OF.items()
    if name != "model_type"  # model.model_type already
} | {
    f"model.data_config.{name}": f"{SECTION_OF[name]}.{name}"
    for name in ("use_raw", "remove_duplicate_genes", "n_data_workers")
}


@dataclass
class RunConfig:
    """Every setting of a run through the engine: one node per concern (see the module's tree)."""

    model: ModelRunConfig = field(default_factory=ModelRunConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)

    def __post_init__(self) -> None:
        if self.output.emb_type == "cge" and "cge" not in self.predict.output_keys:
            self.predict = dataclasses.replace(self.predict, output_keys=(*self.predict.output_keys, "cge"))
        wanted = list(self.predict.output_keys)
        check_output_keys(wanted)
        if self.model.model_type == "esm2ce" and wanted != ["embeddings"]:
            raise ValueError(f"model_type esm2ce only computes cell embeddings; output_keys asked for {wanted}")
        if "gene_llh" in wanted and self.model.loss_config.gene_id_loss_weight <= 0:
            raise ValueError("gene_llh needs a gene-id head, and this checkpoint has none (gene_id_loss_weight = 0)")
        if self.output.writes_soma:
            self._check_soma_output(wanted)
        if self.output.keep_counts and (
            self.input.reads_soma or len(self.input.data_files) > 1 or not self.output.writes_h5ad
        ):
            raise ValueError("keep_counts copies the counts of one input file into the .h5ad: give one of data_files")

    def _check_soma_output(self, wanted: list[str]) -> None:
        if not self.input.reads_soma:
            raise ValueError(
                "output_soma: the array is indexed by the soma_joinid of the input experiment; read the cells with "
                "`soma` or census_version (or write an .h5ad)"
            )
        soma, output_soma = self.input.soma, self.output.output_soma
        if soma and "://" not in soma and "://" not in output_soma:
            source, target = Path(soma).resolve(), Path(output_soma).resolve()
            if target == source or source in target.parents:
                raise ValueError(
                    f"output_soma {output_soma} is inside the input experiment {soma}, which a run only reads; "
                    "choose an output_soma outside it"
                )
        if "embeddings" not in wanted or (not self.output.writes_h5ad and len(wanted) > 1):
            raise ValueError(
                f"output_soma holds cell embeddings and output_keys are {wanted}: compute embeddings, and "
                "write the other outputs to an .h5ad too with `output_format=both`"
            )

    @classmethod
    def from_checkpoint(cls, checkpoint_path: str | Path, **settings: Any) -> RunConfig:
        """Settings for a checkpoint directory: the data, model and loss settings of its ``config.json``.

        Parameters
        ----------
        checkpoint_path
            The checkpoint directory.
        **settings
            Any setting by its name (``data_files``, ``batch_size``, ``model_type``, ...; :meth:`replace`); the
            others keep their defaults, those of the original release.
        """
        path = Path(checkpoint_path)
        if not (path / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{path} is not a TranscriptFormer checkpoint: {CONFIG_FILE} is missing")
        checkpoint = TranscriptFormerConfig.from_json(path / CONFIG_FILE)
        model = ModelRunConfig(
            checkpoint_path=str(checkpoint_path),
            data_config=checkpoint.data_config,
            model_config=checkpoint.model_config,
            loss_config=checkpoint.loss_config,
        )
        sections = sections_of(settings)
        model = dataclasses.replace(model, **sections.pop("model", {}))
        return cls(model, **{name: SECTIONS[name](**values) for name, values in sections.items()})

    def replace(self, **settings: Any) -> RunConfig:
        """A copy with ``settings`` changed, each by its name: ``replace(batch_size=16, resume=True)``.

        Raises
        ------
        TypeError
            For a name that is no setting of a run.
        ValueError
            For a value out of range or settings that do not go together.
        """
        changed = {
            name: dataclasses.replace(getattr(self, name), **values) for name, values in sections_of(settings).items()
        }
        return dataclasses.replace(self, **changed)

    @property
    def checkpoint_config(self) -> TranscriptFormerConfig:
        """The checkpoint part of the settings, as the model loader takes it."""
        return TranscriptFormerConfig(self.model.data_config, self.model.model_config, self.model.loss_config)

    def to_dict(self) -> dict:
        """Plain nested dict of every setting."""
        return dataclasses.asdict(self)


def sections_of(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``settings`` by name, gathered per node of :class:`RunConfig`.

    ``{"batch_size": 16, "resume": True}`` -> ``{"predict": {"batch_size": 16}, "output": {"resume": True}}``.
    """
    unknown = sorted(set(settings) - set(SECTION_OF))
    if unknown:
        raise TypeError(f"no setting of a run is named {', '.join(unknown)} (settings: {sorted(SECTION_OF)})")
    gathered: dict[str, dict[str, Any]] = {}
    for name, value in settings.items():
        gathered.setdefault(SECTION_OF[name], {})[name] = value
    return gathered


def apply_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """Set ``key=value`` overrides (Hydra's grammar) on a copy of ``config``, checking keys and types.

    Examples: ``model.data_config.normalize_to_scale=10000``, ``predict.output_keys=[embeddings,llh]``,
    ``output.obs_keys.0=cell_type``, ``model.data_config.clip_counts=null`` (``None``, in any case, is null too, as
    in the original release). A key's former name (:data:`FORMER_KEYS`: ``model.inference_config.batch_size``) sets
    the setting of its current name.
    """
    if not overrides:
        return config
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    tree = OmegaConf.structured(config)
    OmegaConf.set_readonly(tree.predict, False)  # a frozen PredictConfig: a new one is built from the tree
    parser = OverridesParser.create()
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as error:
            raise ValueError(f"cannot parse config override {text!r}: {error}") from None
        if override.is_sweep_override():
            raise ValueError(f"config override {text!r} is a sweep; give a single value (lists go in [...])")
        if override.type != OverrideType.CHANGE:
            raise ValueError(f"config override {text!r}: only key=value is supported, not adding or deleting keys")
        value = override.value()
        if isinstance(value, str) and value.lower() == "none":  # the original release read None as null
            value = None
        try:
            OmegaConf.update(tree, current_key(override.key_or_group), value, merge=False)
        except (OmegaConfBaseException, ValueError) as error:
            raise ValueError(f"config override {text!r}: {_first_line(error)}") from None
    try:
        return OmegaConf.to_object(tree)
    except (OmegaConfBaseException, ValueError) as error:
        raise ValueError(f"config overrides {list(overrides)}: {_first_line(error)}") from None


def current_key(key: str) -> str:
    """An override's key with the current name of its setting (:data:`FORMER_KEYS`).

    ``model.inference_config.batch_size`` -> ``predict.batch_size``, ``model.inference_config.obs_keys.0`` ->
    ``output.obs_keys.0``; any other key as it is.

    Raises
    ------
    ValueError
        For a key under ``model.inference_config`` that names no setting.
    """
    former = ".".join(key.split(".")[:3])
    if former in FORMER_KEYS:
        return FORMER_KEYS[former] + key[len(former) :]
    if key.startswith("model.inference_config."):
        raise ValueError(f"{key.split('.')[2]!r} is no setting of a run (model.inference_config held them)")
    return key


def _check_choices(name: str, values: Sequence[str], choices: Sequence[str]) -> None:
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise ValueError(f"{name}: {unknown} not among {list(choices)}")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]
