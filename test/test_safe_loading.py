"""No file ever runs code when it is loaded (SECURITY.md), whatever the environment asks torch or numcodecs to allow.

Each load path gets a crafted file whose unpickling would create a marker file (a ``__reduce__`` payload), fed
through the real command: the command exits 1 with one line naming the file, the marker never appears, and no output
that looks complete is written; both with and without ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, which makes torch
unpickle anything when a caller leaves ``weights_only`` unset (as Lightning does).
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import transcriptformer
from conftest import REFERENCE_DIR, REFERENCE_INPUT, TRAIN_CONFIG, assert_no_output, tiny_train_overrides
from transcriptformer.checkpoint import WEIGHTS_FILE, load_checkpoint
from transcriptformer.cli import build_parser, main
from transcriptformer.cli.inference import config_from_args
from transcriptformer.config import CONFIG_FILE
from transcriptformer.engine import parts
from transcriptformer.engine.session import prepare
from transcriptformer.model.classifier import CLASSIFIER_WEIGHTS_FILE, ClassifierInfo, save_classifier
from transcriptformer.model.lora import ADAPTER_WEIGHTS_FILE, LoraConfig, add_lora_adapters, save_adapters
from transcriptformer.safe_load import UnsafeFileError, sha256_of
from transcriptformer.tasks.embed import EmbedTask
from transcriptformer.training.config import FinetuneConfig, TrainDataConfig, TrainerConfig
from transcriptformer.training.run import run_finetuning

TORCH_UNSAFE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
NUMCODECS_UNSAFE = "NUMCODECS_ALLOW_UNSAFE_PICKLE_DECODE"
GENE_TABLE = "mus_musculus_gene.h5"


class Payload:
    """Creates ``marker`` when unpickled: the proof that code from a file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(params=[False, True], ids=["default-env", f"{TORCH_UNSAFE}=1"])
def torch_env(request, monkeypatch) -> bool:
    """Both environments; torch reads the variable at each load, so setting it here reaches the command."""
    if request.param:
        monkeypatch.setenv(TORCH_UNSAFE, "1")
    else:
        monkeypatch.delenv(TORCH_UNSAFE, raising=False)
    return request.param


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code-ran"


def refused(argv: list, capsys, *key_words: str) -> str:
    """Run the command: exit code 1, no traceback, one error line holding ``key_words``; that line is returned."""
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code == 1, output
    assert "Traceback" not in output
    command = next(str(arg) for arg in argv if not str(arg).startswith("-"))
    errors = [line for line in captured.err.splitlines() if line.startswith(f"transcriptformer {command}: error: ")]
    assert len(errors) == 1, captured.err
    for words in key_words:
        assert words in errors[0], errors[0]
    return errors[0]


def checkpoint_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "checkpoint"
    shutil.copytree(REFERENCE_DIR, copy)
    return copy


def inference_args(checkpoint: Path, output: Path, *extra) -> list:
    return ["inference", "--checkpoint-path", checkpoint, "--data-file", REFERENCE_INPUT, "--output-path", output,
            "--batch-size", "16", *extra]  # fmt: skip


# Checkpoint weights (inference, the API, merge-adapters, finetune: every checkpoint load reads model_weights.pt).


def test_weights_with_a_payload_never_run(tmp_path, marker, torch_env, capsys):
    checkpoint = checkpoint_copy(tmp_path)
    state = torch.load(REFERENCE_DIR / WEIGHTS_FILE, weights_only=True)
    torch.save({**state, "extra": Payload(marker)}, checkpoint / WEIGHTS_FILE)
    output = tmp_path / "out"
    refused(
        inference_args(checkpoint, output),
        capsys,
        str(checkpoint / WEIGHTS_FILE),
        "refusing to unpickle model weights: it holds the Python object",
        "transcriptformer download",
    )
    with pytest.raises(UnsafeFileError, match="refusing to unpickle model weights"):
        transcriptformer.load(checkpoint, device="cpu")
    assert not marker.exists()
    assert_no_output(output)


def test_weights_that_are_a_bare_pickle_never_run(adapters, tmp_path, marker, torch_env, capsys):
    checkpoint = checkpoint_copy(tmp_path)
    with open(checkpoint / WEIGHTS_FILE, "wb") as f:
        pickle.dump({"weight": Payload(marker)}, f)
    output = tmp_path / "merged"
    args = ["merge-adapters", "--checkpoint-path", checkpoint, "--adapter", adapters, "--output-path", output]
    refused(args, capsys, str(checkpoint / WEIGHTS_FILE), "refusing to unpickle model weights")
    assert not marker.exists()
    assert not output.exists()


# Gene-embedding tables (.h5): HDF5 holds no pickles, but opaque bytes in place of keys or vectors are refused.


def pickled_bytes(marker: Path) -> np.void:
    return np.void(pickle.dumps(Payload(marker)))


def write_table(path: Path, keys: np.ndarray, vectors: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("keys", data=keys)
        arrays = f.create_group("arrays")
        for gene, vector in vectors.items():
            arrays.create_dataset(gene, data=vector)
    return path


def reference_keys() -> np.ndarray:
    with h5py.File(REFERENCE_DIR / "vocabs" / GENE_TABLE) as f:
        return f["keys"][:]


def test_pretrained_embedding_with_pickled_vectors_is_refused(tmp_path, marker, torch_env, capsys):
    keys = reference_keys()
    table = write_table(tmp_path / "pickled.h5", keys, {key.decode(): pickled_bytes(marker) for key in keys})
    output = tmp_path / "out"
    refused(
        inference_args(REFERENCE_DIR, output, "--pretrained-embedding", table),
        capsys,
        f"{table}: arrays/",
        "not a numeric vector",
        "transcriptformer build-vocab",
    )
    assert not marker.exists()
    assert_no_output(output)


def test_checkpoint_table_with_pickled_keys_is_refused(tmp_path, marker, torch_env, capsys):
    checkpoint = checkpoint_copy(tmp_path)
    table = checkpoint / "vocabs" / GENE_TABLE
    write_table(table, np.array([pickled_bytes(marker)] * 3), {})
    output = tmp_path / "out"
    refused(inference_args(checkpoint, output), capsys, f"{table}: dataset 'keys' holds", "not gene-id strings")
    assert not marker.exists()
    assert_no_output(output)


# LoRA adapters: only adapter_model.safetensors is ever read (a format without code), never a pickled .bin.


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    """Fresh (untrained) adapters of the reference checkpoint, saved as finetune saves them."""
    model = add_lora_adapters(load_checkpoint(REFERENCE_DIR).model, LoraConfig(r=2), str(REFERENCE_DIR))
    return save_adapters(model, tmp_path_factory.mktemp("adapters") / "lora")


def test_adapter_weights_that_are_a_pickle_are_refused(adapters, tmp_path, marker, torch_env, capsys):
    hostile = shutil.copytree(adapters, tmp_path / "adapters")
    torch.save({"lora": Payload(marker)}, hostile / ADAPTER_WEIGHTS_FILE)
    output = tmp_path / "out"
    refused(
        inference_args(REFERENCE_DIR, output, "--adapter", hostile),
        capsys,
        str(hostile / ADAPTER_WEIGHTS_FILE),
        "not a readable safetensors file",
        "transcriptformer finetune",
    )
    assert not marker.exists()
    assert_no_output(output)


def test_pickled_adapter_bin_is_never_read(adapters, tmp_path, marker, torch_env, capsys):
    hostile = shutil.copytree(adapters, tmp_path / "adapters")
    (hostile / ADAPTER_WEIGHTS_FILE).unlink()
    torch.save({"lora": Payload(marker)}, hostile / "adapter_model.bin")  # peft's pickled layout
    output = tmp_path / "merged"
    args = ["merge-adapters", "--checkpoint-path", REFERENCE_DIR, "--adapter", hostile, "--output-path", output]
    refused(args, capsys, f"{hostile} is not an adapter directory", f"{ADAPTER_WEIGHTS_FILE} missing")
    assert not marker.exists()
    assert not output.exists()


def test_classifier_head_that_is_a_pickle_is_refused(adapters, tmp_path, marker, torch_env, capsys):
    hostile = shutil.copytree(adapters, tmp_path / "classifier")
    info = ClassifierInfo(
        label_key="cell_type",
        classes=["a", "b"],
        embed_dim=load_checkpoint(REFERENCE_DIR).config.model_config.embed_dim,
        hidden_dim=0,
        base_checkpoint=str(REFERENCE_DIR),
        base_weights_sha256=sha256_of(REFERENCE_DIR / WEIGHTS_FILE),
        adapter_sha256=sha256_of(hostile / ADAPTER_WEIGHTS_FILE),
    )
    save_classifier(info.new_head(), info, hostile)  # an untrained head, saved as finetune --task classify saves it
    transcriptformer.load(REFERENCE_DIR, device="cpu", adapter=hostile)  # loads as it is
    torch.save({"layers.0.weight": Payload(marker)}, hostile / CLASSIFIER_WEIGHTS_FILE)
    output = tmp_path / "out"
    args = ["predict-labels", "--checkpoint-path", REFERENCE_DIR, "--adapter", hostile, "--data-file", REFERENCE_INPUT,
            "--output-path", output]  # fmt: skip
    refused(args, capsys, str(hostile / CLASSIFIER_WEIGHTS_FILE), "not a readable safetensors file")
    assert not marker.exists()
    assert_no_output(output)


# Lightning checkpoints: finetune --resume and train trainer.resume=.


def hostile_lightning_checkpoint(path: Path, marker: Path) -> Path:
    """Lightning's layout, with a payload among the loop states."""
    torch.save(
        {
            "epoch": 0,
            "global_step": 3,
            "pytorch-lightning_version": "2.6.0",
            "state_dict": {},
            "loops": Payload(marker),
        },
        path,
    )
    return path


def test_finetune_resume_from_a_hostile_checkpoint_never_runs_it(tmp_path, marker, torch_env, capsys):
    resume = hostile_lightning_checkpoint(tmp_path / "last.ckpt", marker)
    output = tmp_path / "adapters"
    args = ["finetune", "--checkpoint-path", REFERENCE_DIR, "--train-files", REFERENCE_INPUT, "--output-path", output,
            "--lora-r", "2", "--max-steps", "4", "--device", "cpu", "--resume", resume]  # fmt: skip
    refused(
        args,
        capsys,
        f"{resume}: refusing to unpickle a Lightning checkpoint",
        "give --resume a checkpoint that this tool's training wrote",
    )
    assert not marker.exists()
    assert not (output / ADAPTER_WEIGHTS_FILE).exists()


def test_train_resume_from_a_hostile_checkpoint_never_runs_it(tmp_path, marker, torch_env, capsys):
    resume = hostile_lightning_checkpoint(tmp_path / "last.ckpt", marker)
    output = tmp_path / "model"
    args = ["train", "--config", TRAIN_CONFIG, *tiny_train_overrides(output, "trainer.max_steps=4"),
            f"trainer.resume={resume}"]  # fmt: skip
    refused(args, capsys, f"{resume}: refusing to unpickle a Lightning checkpoint", "give trainer.resume= a checkpoint")
    assert not marker.exists()
    assert not (output / WEIGHTS_FILE).exists() and not (output / CONFIG_FILE).exists()


class RecordStartStep(Callback):
    def on_train_start(self, trainer, pl_module):
        self.global_step = trainer.global_step


def test_a_real_lightning_checkpoint_still_resumes_under_the_variable(tmp_path, monkeypatch):
    def config(**trainer) -> FinetuneConfig:
        return FinetuneConfig(
            checkpoint_path=str(REFERENCE_DIR),
            output_path=str(tmp_path / "adapters"),
            data=TrainDataConfig(train_files=[str(REFERENCE_INPUT)], batch_size=8),
            trainer=TrainerConfig(device="cpu", **trainer),
            lora=LoraConfig(r=2),
        )

    run_finetuning(config(max_steps=3, checkpoint_every_n_steps=2, keep_checkpoints=-1))
    midway = tmp_path / "adapters" / "training_run" / "checkpoints" / "epoch=0-step=2.ckpt"  # 8 batches per epoch
    monkeypatch.setenv(TORCH_UNSAFE, "1")
    start = RecordStartStep()
    run_finetuning(config(max_steps=3, resume=str(midway)), overwrite=True, callbacks=[start])
    assert start.global_step == 2  # optimizer, scheduler, loops and adapters restored from the checkpoint


# ESM-2 models for build-vocab: fair-esm files are pickles with an argparse.Namespace, which alone is allowed.


def test_build_vocab_refuses_a_hostile_esm_model(tmp_path, marker, torch_env, capsys):
    genes = ad.read_h5ad(REFERENCE_INPUT, backed="r").var["ensembl_id"][:2]
    fasta = tmp_path / "proteins.fa"
    fasta.write_text("".join(f">P{i} pep gene:{gene}.1\nMKVLAAGIVG\n" for i, gene in enumerate(genes)))
    model = tmp_path / "esm2_hostile.pt"
    torch.save({"cfg": {"model": Payload(marker)}, "model": {}}, model)
    args = ["build-vocab", "--fasta", fasta, "--esm-model", model, "--species", "x", "--output-dir", tmp_path / "out"]
    refused(args, capsys, f"{model}: refusing to unpickle an ESM-2 checkpoint", "fair-esm")
    assert not marker.exists()
    assert not (tmp_path / "out" / "x_gene.h5").exists()


# Saved parts of an interrupted inference run (--resume): .npz read with allow_pickle=False.


def interrupted_run(output: Path) -> Path:
    """The parts folder of an interrupted run of the reference cells, set up as the run does; its first part's path."""
    args = build_parser(["inference"]).parse_args([str(a) for a in inference_args(REFERENCE_DIR, output)])
    with prepare(config_from_args(args), torch.device("cpu"), EmbedTask()) as session:
        parts.open_parts_dir(session)
        return parts.part_file(session, session.units[0])


@pytest.mark.parametrize("layout", ["object-array", "bare-pickle"])
def test_resume_refuses_pickled_parts(tmp_path, marker, torch_env, layout, capsys):
    output = tmp_path / "out"
    part = interrupted_run(output)
    if layout == "object-array":
        with open(part, "wb") as f:
            np.savez(f, n_cells=np.array(64), **{"cell/embeddings": np.array([Payload(marker)], dtype=object)})
    else:
        part.write_bytes(pickle.dumps({"n_cells": Payload(marker)}))
    # A bare pickle is found when the resume starts; an object array inside a valid archive when it is merged.
    words = (
        [f"{part}: refusing to unpickle a saved unit of the interrupted run", "delete it and rerun with --resume"]
        if layout == "object-array"
        else [f"{part.name} (it holds pickled Python objects, which are never unpickled)", "rerun with --resume"]
    )
    refused(inference_args(REFERENCE_DIR, output, "--resume"), capsys, *words)
    assert not marker.exists()
    assert_no_output(output)


# zarr inputs: the 'pickle' codec, which NUMCODECS_ALLOW_UNSAFE_PICKLE_DECODE=1 enables, is refused beforehand.


def hostile_zarr(path: Path, marker: Path, consolidated: bool) -> Path:
    """The reference cells as a zarr store whose obs index is stored with the 'pickle' codec."""
    ad.read_h5ad(REFERENCE_INPUT).write_zarr(path)
    codec = {"id": "pickle", "protocol": 4}
    array = path / "obs" / "_index" / ".zarray"
    array.write_text(json.dumps({**json.loads(array.read_text()), "compressor": codec}))
    if consolidated:
        document = json.loads((path / ".zmetadata").read_text())
        document["metadata"]["obs/_index/.zarray"]["compressor"] = codec
        (path / ".zmetadata").write_text(json.dumps(document))
    else:
        (path / ".zmetadata").unlink()
    (path / "obs" / "_index" / "0").write_bytes(pickle.dumps(Payload(marker)))
    return path


LAYOUTS = pytest.mark.parametrize("consolidated", [True, False], ids=["consolidated", "per-array-metadata"])


def zarr_refusal(store: Path, consolidated: bool) -> tuple[str, ...]:
    """Key words of the error: the metadata document that names the codec, the store, the codec and the fix."""
    document = store / (".zmetadata" if consolidated else "obs/_index/.zarray")
    return f"{document}: refusing to read {store}", "'pickle' codec", "adata.write_zarr"


@LAYOUTS
def test_zarr_with_a_pickle_codec_is_refused(tmp_path, marker, consolidated, torch_env, capsys):
    store = hostile_zarr(tmp_path / "cells.zarr", marker, consolidated)
    output = tmp_path / "out"
    args = ["inference", "--checkpoint-path", REFERENCE_DIR, "--data-file", store, "--output-path", output]
    refused(args, capsys, *zarr_refusal(store, consolidated))
    assert not marker.exists()
    assert_no_output(output)


@LAYOUTS
def test_zarr_pickle_codec_is_refused_where_numcodecs_would_unpickle(tmp_path, marker, consolidated):
    store = hostile_zarr(tmp_path / "cells.zarr", marker, consolidated)
    output = tmp_path / "out"
    env = os.environ | {TORCH_UNSAFE: "1", NUMCODECS_UNSAFE: "1"}  # numcodecs reads it on import: a new process
    args = ["inference", "--checkpoint-path", REFERENCE_DIR, "--data-file", store, "--output-path", output]
    result = subprocess.run(
        [sys.executable, "-m", "transcriptformer", *map(str, args)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("transcriptformer inference: error: ")
    assert all(words in message for words in zarr_refusal(store, consolidated)), message
    assert not marker.exists()
    assert_no_output(output)


# Annotation indexes: labels.npz is read with allow_pickle=False, even when the manifest vouches for its SHA-256.


def test_annotation_index_with_pickled_labels_is_refused(tmp_path, marker):
    from transcriptformer.annotation import ReferenceIndex

    vectors = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    folder = ReferenceIndex.build(vectors, {"cell_type": ["a", "b"] * 20}).save(tmp_path / "index")
    labels = folder / "labels.npz"
    np.savez(labels, rows=np.arange(40), codes_0=np.zeros(40, dtype=np.int32), classes_0=np.array([Payload(marker)]))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"]["labels.npz"] = sha256_of(labels)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeFileError, match="labels.npz: refusing to unpickle annotation labels"):
        ReferenceIndex.load(folder)
    assert not marker.exists()
