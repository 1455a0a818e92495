"""Python API: load a checkpoint, run it on cells, get NumPy arrays back.

>>> import transcriptformer
>>> model = transcriptformer.load("tf-sapiens", device="cpu")  # downloaded once into the cache; or a folder
>>> result = model.predict("cells.h5ad", output_keys=["embeddings", "llh"])
>>> result["embeddings"].shape
(n_cells, 2048)
>>> embeddings = model.embed(adata)  # also stored in adata.obsm["X_transcriptformer"]
>>> generated = model.generate(adata, seed=0)  # new cells like those of adata: an AnnData of counts
>>> scores = model.score(adata)  # per-cell log-likelihoods and outlier flags, also stored in adata.obs
>>> classifier = transcriptformer.load("tf-sapiens", adapter="classifiers/cell_type")  # finetune --task classify
>>> probabilities = classifier.classify(adata)  # also adata.obs["predicted_cell_type"] and its probability
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from transcriptformer.annotation.settings import AnnotateConfig
from transcriptformer.checkpoint import GENE_FILE_SUFFIX, WEIGHTS_FILE, Checkpoint, load_checkpoint
from transcriptformer.config import PredictConfig
from transcriptformer.data.sources import read_obs
from transcriptformer.data.tokenize import TokenizedCells
from transcriptformer.engine.config import ModelRunConfig, OutputConfig, RunConfig
from transcriptformer.engine.run import MemoryResult, run_in_memory
from transcriptformer.engine.task import Task
from transcriptformer.errors import UserError
from transcriptformer.hub.cache import resolve_checkpoint
from transcriptformer.model.classifier import Classifier, has_classifier, load_classifier
from transcriptformer.model.outputs import PERTURBATION_KEYS
from transcriptformer.pipeline import predict_positions
from transcriptformer.runtime import Backend, resolve_device
from transcriptformer.tasks.classify import ClassifyTask
from transcriptformer.tasks.embed import EmbedConfig, EmbedTask
from transcriptformer.tasks.generate import GenerateConfig, GenerateTask
from transcriptformer.tasks.perturb import PerturbConfig, PerturbTask
from transcriptformer.tasks.score import CELL_SCORE_KEYS, GENE_SCORE_KEY, ScoreConfig, ScoreTask

if TYPE_CHECKING:
    from transcriptformer.annotation import ReferenceIndex
    from transcriptformer.perturbation.output import PerturbationResult

EMBEDDING_KEY = EmbedConfig.key_added
"""Default ``obsm`` key of :meth:`TranscriptFormerModel.embed` (scanpy's ``X_<basis>``, as scvi-tools' ``X_scVI``)."""


class TranscriptFormerModel:
    """A loaded checkpoint ready for inference.

    Parameters
    ----------
    checkpoint : Checkpoint
        From :func:`~transcriptformer.checkpoint.load_checkpoint`.
    device : torch.device
        Where the model runs.
    classifier : Classifier, optional
        The classification head of the adapters (from ``transcriptformer finetune --task classify``), which
        :meth:`classify` uses.
    """

    def __init__(self, checkpoint: Checkpoint, device: torch.device, classifier: Classifier | None = None):
        self.checkpoint = checkpoint
        self.device = device
        self.classifier = classifier

    @property
    def model(self) -> torch.nn.Module:
        """The underlying :class:`~transcriptformer.model.transcriptformer.TranscriptFormer`."""
        return self.checkpoint.model

    def __repr__(self) -> str:
        """``TranscriptFormerModel(tf_sapiens: 1,062,542,849 parameters, 23,829 genes of homo_sapiens, on cpu)``."""
        n_parameters = sum(parameter.numel() for parameter in self.model.parameters())
        species = ", ".join(
            name.removesuffix(GENE_FILE_SUFFIX) for name in self.checkpoint.config.data_config.esm2_mappings
        )
        text = (
            f"{self.checkpoint.path.name}: {n_parameters:,} parameters, {len(self.checkpoint.gene_vocab.gene_ids):,} "
            f"genes of {species}, on {self.device}"
        )
        if self.classifier is not None:
            info = self.classifier.info
            text += f", classifier of {info.label_key} ({len(info.classes)} classes)"
        return f"{type(self).__name__}({text})"

    def run_task(
        self,
        task: Task,
        data: ad.AnnData | str | Path,
        settings: dict[str, Any],
        use_raw: bool | None = None,
        remove_duplicate_genes: bool = False,
        **data_config: Any,
    ) -> MemoryResult:
        """Run a task of :mod:`transcriptformer.tasks` over ``data`` in memory; nothing is written into ``data``.

        The engine's :func:`~transcriptformer.engine.run.run_in_memory`, with this model's checkpoint and device.

        Parameters
        ----------
        task
            The job.
        data
            An AnnData, or a ``.h5ad``, ``.zarr`` or 10x ``.h5`` path.
        settings
            Settings of the run by name (:meth:`~transcriptformer.engine.config.RunConfig.replace`): ``output_keys``,
            ``batch_size``, ...
        use_raw, remove_duplicate_genes, **data_config
            As for :meth:`tokenize`.
        """
        self.checkpoint.tokenizer(**data_config)  # names an unknown setting
        checkpoint_config = self.checkpoint.config
        model = ModelRunConfig(
            checkpoint_path=str(self.checkpoint.path),
            data_config=dataclasses.replace(checkpoint_config.data_config, **data_config),
            model_config=checkpoint_config.model_config,
            loss_config=checkpoint_config.loss_config,
        )
        config = RunConfig(model).replace(use_raw=use_raw, remove_duplicate_genes=remove_duplicate_genes, **settings)
        return run_in_memory(task, self.checkpoint, data, config, self.device)

    def tokenize(
        self,
        data: ad.AnnData | str | Path,
        *,
        use_raw: bool | None = None,
        remove_duplicate_genes: bool = False,
        **data_config: Any,
    ) -> TokenizedCells:
        """Turn an AnnData (or a ``.h5ad``, ``.zarr`` or 10x ``.h5`` path) into model inputs, all cells at once.

        Parameters
        ----------
        data
            The cells.
        use_raw
            Counts from ``raw`` (True), ``X`` (False), or ``raw`` when present (None).
        remove_duplicate_genes
            Keep the first of duplicated gene ids instead of raising.
        **data_config
            Fields of the checkpoint's :class:`~transcriptformer.config.DataConfig` to change, e.g.
            ``gene_col_name="index"``, ``clip_counts=None``, ``filter_to_vocabs=False``.
        """
        tokenizer = self.checkpoint.tokenizer(remove_duplicate_genes=remove_duplicate_genes, **data_config)
        return tokenizer.tokenize(data, use_raw)

    def predict(
        self,
        data: ad.AnnData | str | Path | TokenizedCells,
        *,
        output_keys: Collection[str] = PredictConfig.output_keys,
        batch_size: int = PredictConfig.batch_size,
        max_tokens: int | None = PredictConfig.max_tokens,
        precision: str | None = PredictConfig.precision,
        embedding_layer_index: int = PredictConfig.embedding_layer_index,
        **tokenize_kwargs: Any,
    ) -> dict[str, np.ndarray]:
        """Outputs of every cell, in input order.

        Parameters
        ----------
        data
            AnnData, file path, or cells already tokenized with :meth:`tokenize`.
        output_keys
            Any of :data:`~transcriptformer.model.outputs.OUTPUT_KEYS`: ``embeddings``, ``llh``, ``gene_llh``,
            ``mu``, ``cge`` (described in :mod:`transcriptformer.model.outputs`).
        batch_size
            Cells per forward pass; results do not depend on it.
        max_tokens
            Token budget per forward pass instead of a fixed ``batch_size``.
        precision
            ``"32"``, ``"16-mixed"`` or ``"bf16-mixed"``; ``None``: ``16-mixed`` on CUDA, ``32`` elsewhere.
        embedding_layer_index
            The layer whose output ``embeddings`` pools: 0 the first, negative from the end; -1 (the last layer)
            gives the original release's embeddings (as Geneformer's ``emb_layer``).
        **tokenize_kwargs
            Passed to :meth:`tokenize`.

        Returns
        -------
        dict of str to ndarray
            The requested outputs, plus ``gene_token_indices`` and ``gene_counts`` ``(n_cells, seq_len)`` (the
            model inputs, which say which gene each per-position output belongs to) and ``aux_token_indices``.
            Per-position outputs are 0 at padding.
        """
        settings = PredictConfig(tuple(output_keys), batch_size, max_tokens, precision, embedding_layer_index)
        cells = data if isinstance(data, TokenizedCells) else self.tokenize(data, **tokenize_kwargs)
        return predict_positions(self.model, cells, settings, self.device)

    def embed(
        self,
        data: ad.AnnData | str | Path,
        *,
        key_added: str | None = EMBEDDING_KEY,
        batch_size: int = PredictConfig.batch_size,
        max_tokens: int | None = PredictConfig.max_tokens,
        precision: str | None = PredictConfig.precision,
        embedding_layer_index: int = PredictConfig.embedding_layer_index,
        **tokenize_kwargs: Any,
    ) -> np.ndarray:
        """Cell embeddings ``(n_cells, E)``, also stored in ``adata.obsm[key_added]`` when given an AnnData.

        Like scvi-tools' ``get_latent_representation`` followed by ``adata.obsm["X_scVI"] = ...``; with the
        default key, scanpy finds them as ``use_rep="X_transcriptformer"`` or ``basis="transcriptformer"``.

        Parameters
        ----------
        data
            An AnnData (changed in place: rows follow ``adata.obs_names``), or a ``.h5ad``, ``.zarr`` or 10x
            ``.h5`` path (read only: the embeddings are returned, the file is not changed).
        key_added
            ``obsm`` key of an AnnData's embeddings; ``None`` leaves the AnnData unchanged. A path accepts no
            other key than the default (a file is never written).
        batch_size, max_tokens, precision, embedding_layer_index
            As for :meth:`predict`; results do not depend on the first two.
        **tokenize_kwargs
            Passed to :meth:`tokenize`.

        Returns
        -------
        ndarray
            ``(n_cells, E)`` float32, in input order.
        """
        if not isinstance(data, ad.AnnData) and key_added not in (EMBEDDING_KEY, None):
            raise ValueError(
                f"key_added={key_added!r} needs an AnnData, which embed fills in place, but {data} is only read: "
                "pass anndata.read_h5ad(path) instead, or leave key_added out"
            )
        task = EmbedTask(settings=EmbedConfig(key_added))
        settings = {
            "output_keys": ["embeddings"],
            "batch_size": batch_size,
            "max_tokens": max_tokens,
            "precision": precision,
            "embedding_layer_index": embedding_layer_index,
        }
        result = self.run_task(task, data, settings, **tokenize_kwargs)
        if isinstance(data, ad.AnnData) and key_added is not None:
            store_every_cell(data, result, task, f"obsm[{key_added!r}]", "pass key_added=None to get the array only")
        return result.outputs.cell_values["embeddings"]

    def classify(
        self,
        data: ad.AnnData | str | Path,
        *,
        batch_size: int = PredictConfig.batch_size,
        **tokenize_kwargs: Any,
    ) -> pd.DataFrame:
        """Class probabilities of every cell, from the classifier the adapters were loaded with.

        With an AnnData, also writes (``key`` the classifier's label key, e.g. ``cell_type``)
        ``obs["predicted_<key>"]`` (categorical, categories the classes), ``obs["predicted_<key>_probability"]``
        (its probability), ``obsm["<key>_probabilities"]`` (``(n_cells, n_classes)``) and
        ``uns["<key>_probabilities"]["classes"]`` (the columns' class names). A cell without any count of the
        vocabulary's genes has NaN probabilities and no predicted class.

        Parameters
        ----------
        data
            An AnnData (changed in place), or a ``.h5ad``, ``.zarr`` or 10x ``.h5`` path (only read).
        batch_size
            Cells per forward pass; results do not depend on it.
        **tokenize_kwargs
            Passed to :meth:`tokenize`.

        Returns
        -------
        DataFrame
            ``(n_cells, n_classes)`` probabilities, index the cells' names, columns the classes.

        Raises
        ------
        UserError
            When the model was loaded without a classifier.
        """
        if self.classifier is None:
            raise UserError(
                "this model has no classifier: load it with transcriptformer.load(CHECKPOINT, adapter=FOLDER), "
                "FOLDER written by 'transcriptformer finetune --task classify'"
            )
        task = ClassifyTask(classifier=self.classifier)
        result = self.run_task(task, data, {"output_keys": ["embeddings"], "batch_size": batch_size}, **tokenize_kwargs)
        if isinstance(data, ad.AnnData):
            store_every_cell(data, result, task, "obs", "pass its path to get the probabilities only")
        probabilities = result.outputs.cell_values[task.probabilities_key]
        return pd.DataFrame(probabilities, index=result.obs.index, columns=task.settings.classes)

    def generate(
        self,
        data: ad.AnnData | str | Path | None = None,
        *,
        aux: dict[str, str] | None = None,
        genes: Sequence[str] | str = (),
        **settings: Any,
    ) -> ad.AnnData:
        """Sample new cells, gene by gene with their counts (docs/generate.md).

        Parameters
        ----------
        data
            Prompt cells: generated cell ``i`` takes the aux values, number of genes and total count of prompt
            cell ``i`` modulo their number (cells without counts are left out). ``None``: give ``num_cells`` and
            ``library_size``.
        aux
            Aux column -> value for every cell (e.g. ``{"assay": "MERFISH"}``), instead of the prompt cells'.
        genes
            Genes (ids or symbols) every cell starts with, in this order; their counts are drawn. A string is one
            gene.
        **settings
            Fields of :class:`~transcriptformer.config.SamplingConfig`: ``num_cells``, ``max_genes``,
            ``num_genes``, ``library_size``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``batch_size``,
            ``prompt_genes``, ``use_cache``.

        Returns
        -------
        AnnData
            Cells x the vocabulary's genes, raw counts in ``X``; see :mod:`transcriptformer.tasks.generate`.
        """
        if isinstance(data, TokenizedCells):
            raise TypeError("data takes an AnnData or the path of a file of prompt cells, not tokenized cells")
        task = GenerateTask(settings=GenerateConfig(aux=aux or {}, genes=genes, **settings))
        result = self.run_task(task, data, {}, drop_empty_cells=True)
        return task.to_anndata(result, self.checkpoint)

    def score(
        self,
        data: ad.AnnData | str | Path,
        *,
        outlier_threshold: float = ScoreConfig.outlier_threshold,
        batch_size: int = PredictConfig.batch_size,
        max_tokens: int | None = PredictConfig.max_tokens,
        precision: str | None = PredictConfig.precision,
        use_raw: bool | None = None,
        remove_duplicate_genes: bool = False,
        **data_config: Any,
    ) -> pd.DataFrame:
        """Log-likelihood of every cell under the model, and the cells whose likelihood is an outlier.

        Definitions in ``docs/score.md``: natural logarithms, higher = more likely; a cell's score sums its
        positions' scores of gene identity and count (and the ``[END]`` term of a cell cut at ``seq_len``).

        Parameters
        ----------
        data
            An AnnData (changed in place, see below), or a ``.h5ad``, ``.zarr`` or 10x ``.h5`` path (only read).
        outlier_threshold
            A cell is flagged when the robust z-score of its ``mean_log_likelihood`` against the other cells of
            ``data`` is below ``-outlier_threshold`` (:func:`~transcriptformer.tasks.score.flag_outliers`).
        batch_size, max_tokens, precision
            As for :meth:`predict`; results do not depend on the first two.
        use_raw, remove_duplicate_genes, **data_config
            As for :meth:`tokenize`.

        Returns
        -------
        DataFrame
            One row per cell, index the cell names: ``log_likelihood``, ``log_likelihood_gene_id``,
            ``log_likelihood_count``, ``mean_log_likelihood`` (NaN for a cell without counts),
            ``mean_log_likelihood_robust_z`` and ``likelihood_outlier``. Given an AnnData, these columns are also
            written into ``adata.obs``, the rule as applied into ``adata.uns["score_qc"]``, and each cell's
            per-gene scores into ``adata.layers["gene_log_likelihood"]`` (sparse, aligned to ``adata.var``: an
            entry for each gene of the cell's sequence; none for genes the model did not read, nor for genes that
            only ``adata.raw`` has when the counts come from there).
        """
        task = ScoreTask(settings=ScoreConfig(outlier_threshold=outlier_threshold))  # checked before the model runs
        settings = {
            "output_keys": [*CELL_SCORE_KEYS, GENE_SCORE_KEY],
            "batch_size": batch_size,
            "max_tokens": max_tokens,
            "precision": precision,
        }
        result = self.run_task(task, data, settings, use_raw, remove_duplicate_genes, **data_config)
        if isinstance(data, ad.AnnData):
            store_every_cell(data, result, task, "adata.obs", "turn the cell filters off")
        return result.obs

    def annotate(
        self,
        query: ad.AnnData | str | Path,
        reference: ad.AnnData | str | Path | ReferenceIndex,
        label_key: str | Sequence[str] | None = None,
        *,
        n_neighbors: int = AnnotateConfig.n_neighbors,
        metric: str = AnnotateConfig.metric,
        reject: bool = AnnotateConfig.reject,
        false_unknown_rate: float = AnnotateConfig.false_unknown_rate,
        batch_size: int = PredictConfig.batch_size,
        max_tokens: int | None = PredictConfig.max_tokens,
        precision: str | None = PredictConfig.precision,
        **tokenize_kwargs: Any,
    ) -> pd.DataFrame:
        """Label the query cells from a labelled reference, both embedded by this model (docs/annotate.md).

        The task of ``transcriptformer annotate`` (:class:`~transcriptformer.tasks.annotate.AnnotateTask`), in
        memory: the reference is embedded and indexed (or given as a :class:`ReferenceIndex` built by this model),
        the query embedded and each cell labelled by its reference neighbours' vote, ``"Unknown"`` below the
        threshold chosen on the reference.

        Parameters
        ----------
        query
            An AnnData (changed in place, see below), or a ``.h5ad``, ``.zarr`` or 10x ``.h5`` path (only read).
        reference
            The labelled reference cells (an AnnData, or a path), or a saved and loaded index.
        label_key
            The reference obs column(s) to transfer; ``None`` with an index: the index's.
        n_neighbors, metric, reject, false_unknown_rate
            As for :func:`transcriptformer.annotate` (``reject=False``: no Unknown).
        batch_size, max_tokens, precision, **tokenize_kwargs
            As for :meth:`embed`, for both sets of cells.

        Returns
        -------
        DataFrame
            One row per query cell: ``predicted_<key>`` and ``<key>_confidence`` per label key. Given an AnnData,
            they are also written into ``query.obs``, the summary into ``query.uns["annotation"]`` and the
            embeddings into ``query.obsm["X_transcriptformer"]``.
        """
        from transcriptformer.annotation import ReferenceIndex
        from transcriptformer.safe_load import sha256_of
        from transcriptformer.tasks.annotate import EMBEDDINGS, AnnotateTask, AnnotateTaskConfig

        model_id = sha256_of(self.checkpoint.path / WEIGHTS_FILE)
        batches = {"batch_size": batch_size, "max_tokens": max_tokens, "precision": precision}
        if isinstance(reference, ReferenceIndex):
            index = reference
            index.check_model(model_id)
        else:
            labels = reference.obs if isinstance(reference, ad.AnnData) else read_obs(reference)
            embeddings = self.embed(reference, key_added=None, **batches, **tokenize_kwargs)
            settings = AnnotateConfig(
                n_neighbors=n_neighbors, metric=metric, false_unknown_rate=false_unknown_rate, reject=reject
            )
            index = ReferenceIndex.build(embeddings, labels, label_key, model_id=model_id, settings=settings)
        keys = index.label_keys if label_key is None else [label_key] if isinstance(label_key, str) else list(label_key)
        task = AnnotateTask(settings=AnnotateTaskConfig(label_keys=keys, reject=reject, figures=False), reference=index)
        result = self.run_task(task, query, {"output_keys": [EMBEDDINGS], **batches}, **tokenize_kwargs)
        if isinstance(query, ad.AnnData):
            store_every_cell(query, result, task, "query.obs", "subset the query to the cells with counts first")
        return result.obs

    def perturb(
        self,
        data: ad.AnnData | str | Path,
        knock_out: Sequence[str] | str = PerturbConfig.knock_out,
        over_express: Sequence[str] | str = PerturbConfig.over_express,
        *,
        top_genes: int = PerturbConfig.top_genes,
        chunk_size: int = OutputConfig.chunk_size,
        batch_size: int = PredictConfig.batch_size,
        max_tokens: int | None = PredictConfig.max_tokens,
        precision: str | None = PredictConfig.precision,
        use_raw: bool | None = None,
        remove_duplicate_genes: bool = False,
        **data_config: Any,
    ) -> PerturbationResult:
        """In-silico perturbation: knock genes out of every cell or over-express them, and compare the outputs.

        Runs the task of ``transcriptformer perturb`` (:class:`~transcriptformer.tasks.perturb.PerturbTask`) in
        memory. Each perturbation is applied to each cell at the count level; a cell whose model inputs it does not
        change (a knock-out of a gene the cell does not express) is unaffected and not run. Definitions and caveats:
        ``docs/perturb.md``.

        Parameters
        ----------
        data
            An AnnData (only read), or a ``.h5ad``, ``.zarr`` or 10x ``.h5`` path.
        knock_out
            Genes to remove, one perturbation each: Ensembl ids of the vocabulary or symbols (``"Gad1"``);
            ``"Gad1+Gad2"`` removes both at once.
        over_express
            ``"GENE=COUNT"`` sets the gene's count, ``"GENE"`` sets it to the cell's highest count; one
            perturbation each, ``+`` joins genes.
        top_genes
            Rows of the ranked gene table per perturbation; 0: all.
        chunk_size
            Cells perturbed and run together (memory grows with it times the perturbations); results do not
            depend on it.
        batch_size, max_tokens, precision
            As for :meth:`predict`; results do not depend on the first two.
        use_raw, remove_duplicate_genes, **data_config
            As for :meth:`tokenize`.

        Returns
        -------
        PerturbationResult
            ``summary`` (one row per perturbation), ``genes`` (the most affected genes of each, ranked) and
            ``cells`` (an AnnData of one row per perturbation and cell); ``write(folder)`` saves them.
        """
        from transcriptformer.perturbation.output import PerturbationResult

        task = PerturbTask(settings=PerturbConfig(knock_out, over_express, top_genes))
        settings = {
            "output_keys": list(PERTURBATION_KEYS),
            "chunk_size": chunk_size,
            "batch_size": batch_size,
            "max_tokens": max_tokens,
            "precision": precision,
        }
        result = self.run_task(task, data, settings, use_raw, remove_duplicate_genes, **data_config)
        return PerturbationResult.from_memory(result)


def load(
    name_or_path: str | Path,
    device: str | torch.device | None = "auto",
    attention_backend: Backend = "auto",
    adapter: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
) -> TranscriptFormerModel:
    """Load a checkpoint for inference: a folder, or a published model downloaded once into a local cache.

    Parameters
    ----------
    name_or_path
        A checkpoint folder in the published layout, or a published model: ``"tf-sapiens"``, ``"tf-exemplar"``,
        ``"tf-metazoa"``. A name is downloaded on first use (resumable, verified) into ``cache_dir`` and read
        from there afterwards, without network access. A folder of that name, when one exists, wins.
    device
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    attention_backend
        ``"auto"``, ``"flex"``, ``"chunked"`` or ``"dense"``.
    adapter
        LoRA adapters (from ``transcriptformer finetune``) to merge into the weights; when the folder also holds a
        classifier (``finetune --task classify``), it is checked against the checkpoint and loaded for
        :meth:`TranscriptFormerModel.classify`.
    cache_dir
        Where published models are kept; default ``$TRANSCRIPTFORMER_CACHE``, else the platform's user cache
        folder (``~/.cache/transcriptformer`` on Linux). See :mod:`transcriptformer.hub.cache`.
    """
    path = resolve_checkpoint(name_or_path, cache_dir)
    device = resolve_device(device)
    classifier = None
    if adapter is not None and has_classifier(adapter):  # checked first: adapters of another base fail obscurely
        classifier = load_classifier(adapter, Path(path) / WEIGHTS_FILE)
    checkpoint = load_checkpoint(path, device, attention_backend, adapter=adapter)
    return TranscriptFormerModel(checkpoint, device, classifier)


def store_every_cell(adata: ad.AnnData, result: MemoryResult, task: Task, place: str, alternative: str) -> None:
    """Let ``task`` store ``result`` in ``adata``, once sure that it holds a row for each cell of ``adata``."""
    if len(result.obs) != adata.n_obs:
        raise ValueError(
            f"cell filters kept {len(result.obs)} of {adata.n_obs} cells, so {place} cannot hold their results: "
            f"subset the AnnData first, or {alternative}"
        )
    task.write_into(adata, result)
