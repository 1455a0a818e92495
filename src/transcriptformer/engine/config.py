"""Typed settings of an inference run and Hydra-style overrides on them.

The settings form one tree, laid out like the original release's ``inference_config.yaml`` so that its override
keys keep working::

    model:
      checkpoint_path, model_type
      data_config:       transcriptformer.config.DataConfig   (gene_col_name, clip_counts, normalize_to_scale, ...)
      model_config:      transcriptformer.config.ModelConfig
      loss_config:       transcriptformer.config.LossConfig
      inference_config:  InferenceConfig                      (batch_size, output_keys, obs_keys, ...)

:func:`apply_overrides` parses ``key=value`` strings with Hydra's override grammar (lists, ``null``, quoted
strings) and sets them through OmegaConf, which checks every key and type against the dataclasses. This module
imports neither Hydra nor torch until an override is applied, so that the command line starts fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transcriptformer.config import (
    CONFIG_FILE,
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


@dataclass
class InferenceConfig:
    """What to run on, where, and what to write.

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
    output_path, output_filename : str
        The output file is ``output_path / output_filename``; the saved units of a run wait beside it (a folder
        that every process can write to).
    output_format : str or None
        ``h5ad``, ``soma`` (cell embeddings into a SOMA array at ``output_soma``, no ``.h5ad``) or ``both``;
        ``None``: ``soma`` when ``output_soma`` is given, else ``h5ad``.
    output_soma : str or None
        Folder or URI of the SOMA array of cell embeddings, indexed by the input's ``soma_joinid``, as the Census
        stores its hosted embeddings.
    batch_size : int
        Cells per forward pass; outputs do not depend on it.
    max_tokens : int or None
        Token budget per forward pass (cells x batch length) instead of a fixed ``batch_size``.
    output_keys : list of str
        Any of :data:`~transcriptformer.model.outputs.OUTPUT_KEYS`: ``embeddings``, ``llh``, ``gene_llh``, ``mu``
        and ``cge`` (contextual gene embeddings).
    obs_keys : list of str
        ``obs`` columns to keep; ``["all"]`` keeps every column.
    precision : str or None
        ``"32"``, ``"16-mixed"`` or ``"bf16-mixed"``; ``None`` picks ``16-mixed`` on CUDA and ``32`` elsewhere.
    pretrained_embedding : list of str
        Gene-embedding files that replace the model's own table (out-of-distribution species).
    adapter : str or None
        LoRA adapter directory merged into the weights.
    emb_type : str
        ``"cell"``, or ``"cge"`` to also write contextual gene embeddings (the original release's flag: ``cge``
        is then added to ``output_keys``).
    embedding_layer_index : int
        The layer whose output the cell embedding pools: 0 the first, negative from the end; -1 (the last layer)
        gives the original release's embeddings.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    num_gpus : int
        Worker processes, one per GPU; ``-1``: every visible GPU. On CPU: the number of CPU processes.
    n_data_workers : int
        Threads that read and tokenize the next units of cells while the model runs, per process (0: none).
    use_raw : bool or None
        Counts from ``adata.raw.X`` (True), ``adata.X`` (False), or ``raw`` when present (None).
    remove_duplicate_genes : bool
        Keep the first of duplicated gene ids instead of stopping with an error.
    overwrite : bool
        Replace an existing output file.
    resume : bool
        Continue an interrupted run with the same settings: units whose outputs were saved are not run again.
    chunk_size : int
        Cells per unit of work; each unit's outputs are written to disk when it is done.
    attention_backend : str
        One of :data:`transcriptformer.runtime.BACKENDS`; ``auto`` picks flex on CUDA, chunked elsewhere.
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
    output_path: str = "./inference_results"
    output_filename: str = "embeddings.h5ad"
    output_format: str | None = None
    output_soma: str | None = None
    batch_size: int = PredictConfig.batch_size
    max_tokens: int | None = PredictConfig.max_tokens
    output_keys: list[str] = field(default_factory=lambda: list(PredictConfig.output_keys))
    obs_keys: list[str] = field(default_factory=lambda: [ALL_OBS_KEYS])
    precision: str | None = PredictConfig.precision
    pretrained_embedding: list[str] = field(default_factory=list)
    adapter: str | None = None
    emb_type: str = "cell"
    embedding_layer_index: int = PredictConfig.embedding_layer_index
    device: str = "auto"
    num_gpus: int = 1
    n_data_workers: int = 0
    use_raw: bool | None = None
    remove_duplicate_genes: bool = False
    overwrite: bool = False
    resume: bool = False
    chunk_size: int = 1024
    attention_backend: str = "auto"
    use_oom_dataloader: bool = False

    def __post_init__(self) -> None:
        _check_choices("emb_type", [self.emb_type], EMB_TYPES)
        if self.emb_type == "cge" and "cge" not in self.output_keys:
            self.output_keys = [*self.output_keys, "cge"]
        check_output_keys(self.output_keys)
        _ = self.predict_config  # built once here to validate batch_size, max_tokens and precision
        _check_choices("device", [self.device], DEVICES)
        _check_choices("attention_backend", [self.attention_backend], BACKENDS)
        check_range(self, "", "chunk_size", at_least=1)
        if self.output_filename in ("", ".", "..") or Path(self.output_filename).name != self.output_filename:
            raise ValueError(
                f"output_filename {self.output_filename!r} is not a file name: give the folder as output_path and "
                "a name without '/' as output_filename"
            )
        if self.num_gpus != -1:
            check_range(self, "", "num_gpus", at_least=1, also="or -1: every visible GPU")
        check_range(self, "", "n_data_workers", at_least=0)
        if not self.obs_keys:
            raise ValueError(f"obs_keys is empty: list columns, or [{ALL_OBS_KEYS}] for every column")
        repeated = sorted({key for key in self.obs_keys if self.obs_keys.count(key) > 1})
        if repeated:
            raise ValueError(f"obs_keys names {repeated} more than once; list each column once")
        self._check_soma_input()
        self._check_soma_output()

    def _check_soma_input(self) -> None:
        given = [name for name in ("data_files", "soma", "census_version") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are alternatives: read the cells from one of them")
        if self.census_version and not self.organism:
            raise ValueError("census_version: the Census holds one experiment per organism; choose one with `organism`")
        if self.organism and not self.reads_soma:
            raise ValueError("`organism` selects the experiment of a Census: give `soma` or census_version")

    def _check_soma_output(self) -> None:
        if self.output_format is not None:
            _check_choices("output_format", [self.output_format], OUTPUT_FORMATS)
        if not self.writes_soma:
            if self.output_soma:
                raise ValueError(f"output_soma is written when output_format is soma or both, not {self.output_format}")
            return
        if not self.output_soma:
            raise ValueError(f"`output_format={self.output_format}` writes a SOMA array: give its URI with output_soma")
        if not self.reads_soma:
            raise ValueError(
                "output_soma: the array is indexed by the soma_joinid of the input experiment; read the cells with "
                "`soma` or census_version (or write an .h5ad)"
            )
        if self.soma and "://" not in self.soma and "://" not in self.output_soma:
            source, target = Path(self.soma).resolve(), Path(self.output_soma).resolve()
            if target == source or source in target.parents:
                raise ValueError(
                    f"output_soma {self.output_soma} is inside the input experiment {self.soma}, which a run only "
                    "reads; choose an output_soma outside it"
                )
        if "embeddings" not in self.output_keys or (not self.writes_h5ad and len(self.output_keys) > 1):
            raise ValueError(
                f"output_soma holds cell embeddings and output_keys are {self.output_keys}: compute embeddings, and "
                "write the other outputs to an .h5ad too with `output_format=both`"
            )

    @property
    def reads_soma(self) -> bool:
        """Whether the cells come from a SOMA experiment (``soma`` or ``census_version``)."""
        return bool(self.soma or self.census_version)

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

    @property
    def predict_config(self) -> PredictConfig:
        """The settings of the batch loop."""
        return PredictConfig(
            tuple(self.output_keys), self.batch_size, self.max_tokens, self.precision, self.embedding_layer_index
        )


@dataclass
class ModelRunConfig:
    """The ``model`` node: the checkpoint, the model family, and all settings."""

    checkpoint_path: str = ""
    model_type: str = "transcriptformer"
    data_config: DataConfig = field(default_factory=DataConfig)
    model_config: ModelConfig = field(default_factory=ModelConfig)
    loss_config: LossConfig = field(default_factory=LossConfig)
    inference_config: InferenceConfig = field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        _check_choices("model_type", [self.model_type], MODEL_TYPES)
        wanted = self.inference_config.output_keys
        if self.model_type == "esm2ce" and wanted != ["embeddings"]:
            raise ValueError(f"model_type esm2ce only computes cell embeddings; output_keys asked for {wanted}")
        if "gene_llh" in wanted and self.loss_config.gene_id_loss_weight <= 0:
            raise ValueError("gene_llh needs a gene-id head, and this checkpoint has none (gene_id_loss_weight = 0)")


@dataclass
class RunConfig:
    """Every setting of an inference run."""

    model: ModelRunConfig = field(default_factory=ModelRunConfig)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_path: str | Path,
        inference: InferenceConfig | None = None,
        model_type: str = "transcriptformer",
    ) -> RunConfig:
        """Settings for a checkpoint directory: the data, model and loss settings of its ``config.json``.

        Parameters
        ----------
        checkpoint_path
            The checkpoint directory.
        inference
            Run settings; the original release's defaults when omitted.
        model_type
            ``transcriptformer`` or ``esm2ce``.
        """
        path = Path(checkpoint_path)
        if not (path / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{path} is not a TranscriptFormer checkpoint: {CONFIG_FILE} is missing")
        checkpoint = TranscriptFormerConfig.from_json(path / CONFIG_FILE)
        section = ModelRunConfig(
            checkpoint_path=str(checkpoint_path),
            model_type=model_type,
            data_config=checkpoint.data_config,
            model_config=checkpoint.model_config,
            loss_config=checkpoint.loss_config,
            inference_config=inference or InferenceConfig(),
        )
        return cls(section)

    @property
    def inference(self) -> InferenceConfig:
        """Shortcut to ``model.inference_config``."""
        return self.model.inference_config

    @property
    def checkpoint_config(self) -> TranscriptFormerConfig:
        """The checkpoint part of the settings, as the model loader takes it."""
        return TranscriptFormerConfig(self.model.data_config, self.model.model_config, self.model.loss_config)

    def to_dict(self) -> dict:
        """Plain nested dict of every setting."""
        return dataclasses.asdict(self)


def apply_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """Set ``key=value`` overrides (Hydra's grammar) on a copy of ``config``, checking keys and types.

    Examples: ``model.data_config.normalize_to_scale=10000``,
    ``model.inference_config.output_keys=[embeddings,llh]``, ``model.inference_config.obs_keys.0=cell_type``,
    ``model.data_config.clip_counts=null`` (``None``, in any case, is null too, as in the original release).
    """
    if not overrides:
        return config
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    tree = OmegaConf.structured(config)
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
            OmegaConf.update(tree, override.key_or_group, value, merge=False)
        except OmegaConfBaseException as error:
            raise ValueError(f"config override {text!r}: {_first_line(error)}") from None
    try:
        return OmegaConf.to_object(tree)
    except (OmegaConfBaseException, ValueError) as error:
        raise ValueError(f"config overrides {list(overrides)}: {_first_line(error)}") from None


def _check_choices(name: str, values: Sequence[str], choices: Sequence[str]) -> None:
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise ValueError(f"{name}: {unknown} not among {list(choices)}")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]
