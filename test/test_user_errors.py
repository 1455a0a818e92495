"""Every user mistake with inputs, files and flags ends in one line naming the file or flag, never a traceback.

Each case builds its broken input in ``tmp_path`` from the real files under ``test/data`` and checks the exit
code, the absence of a traceback, the message's key words, and that nothing that looks like a finished output
was written.
"""

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from conftest import DATA_DIR, REFERENCE_DIR, REFERENCE_INPUT, TRAIN_CONFIG, assert_no_output, tiny_train_overrides
from local_http_server import LocalServer
from transcriptformer.cli import build_parser, main, subcommand_parser
from transcriptformer.cli.common import with_flag_names
from transcriptformer.engine import HardwareConfig, RunConfig, run_task
from transcriptformer.tasks.embed import EmbedTask

GENE_TABLE = "vocabs/mus_musculus_gene.h5"
TENX_HUMAN = DATA_DIR / "10x_v3_chr21_1107cells.h5"
INPUT_BYTES = REFERENCE_INPUT.stat().st_size


def run_cli(capsys, *args) -> tuple[int, str]:
    """Run the command in-process; return its exit code (argparse's too) and what it printed on stderr."""
    try:
        code = main([str(arg) for arg in args])
    except SystemExit as exit_:  # a usage error, reported by argparse
        code = exit_.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, command: str, *words: str, exit_code: int = 1) -> None:
    """Exit code, no traceback, and the last line is the command's error, holding every one of ``words``."""
    assert code == exit_code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    prefix = (
        f"transcriptformer {command}: error: " if exit_code == 1 else f"transcriptformer {command}: error: argument "
    )
    assert last.startswith(prefix), err
    for word in words:
        assert word in last, (word, last)


def truncated(source: Path, dest: Path) -> Path:
    """The first half of ``source``."""
    data = source.read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    return dest


def text_file(dest: Path) -> Path:
    dest.write_text("cell,gene,count\nAAAC,Xkr4,3\n")
    return dest


def folder(dest: Path) -> Path:
    dest.mkdir()
    return dest


def write_10x(path: Path, adata: ad.AnnData) -> Path:
    """Cells of an AnnData as a Cell Ranger v3 feature-barcode matrix (genes x cells CSC = cells x genes CSR)."""
    counts = sp.csr_matrix(adata.X)
    with h5py.File(path, "w") as f:
        matrix = f.create_group("matrix")
        matrix["data"] = counts.data.astype(np.int32)
        matrix["indices"] = counts.indices.astype(np.int64)
        matrix["indptr"] = counts.indptr.astype(np.int64)
        matrix["shape"] = np.array([adata.n_vars, adata.n_obs], dtype=np.int32)
        matrix["barcodes"] = np.array(adata.obs_names, dtype="S")
        features = matrix.create_group("features")
        features["id"] = np.array(adata.var["ensembl_id"], dtype="S")
        features["name"] = np.array(adata.var_names, dtype="S")
        features["feature_type"] = np.array(["Gene Expression"] * adata.n_vars, dtype="S")
    return path


def reference_10x(tmp_path: Path, change: Callable[[h5py.Group], None] | None = None) -> Path:
    """The reference cells as a 10x ``.h5`` file, with ``change`` applied to its ``matrix`` group."""
    path = write_10x(tmp_path / "cells.h5", ad.read_h5ad(REFERENCE_INPUT))
    if change is not None:
        with h5py.File(path, "r+") as f:
            change(f["matrix"])
    return path


def replace(name: str, value) -> Callable[[h5py.Group], None]:
    def change(matrix: h5py.Group) -> None:
        del matrix[name]
        matrix[name] = value

    return change


def remove(*names: str) -> Callable[[h5py.Group], None]:
    def change(matrix: h5py.Group) -> None:
        for name in names:
            del matrix[name]

    return change


def checkpoint_with(tmp_path: Path, name: str, make: Callable[[Path, Path], Path]) -> Path:
    """A copy of the reference checkpoint whose file ``name`` is replaced by ``make(original, path)``."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(REFERENCE_DIR, checkpoint, ignore=shutil.ignore_patterns("input.h5ad", "expected.npz"))
    (checkpoint / name).unlink()
    make(REFERENCE_DIR / name, checkpoint / name)
    return checkpoint


def inference(capsys, tmp_path: Path, data: Path, checkpoint: Path = REFERENCE_DIR, *extra) -> tuple[int, str]:
    """``inference`` into ``tmp_path/out``; asserts afterwards that no output file was left there."""
    out = tmp_path / "out"
    result = run_cli(
        capsys, "inference", "--checkpoint-path", checkpoint, "--data-file", data, "--output-path", out, *extra
    )
    assert not (out / "embeddings.h5ad").exists()
    assert not out.exists() or not any(p.suffix == ".h5ad" for p in out.rglob("*"))
    return result


def not_anndata(dest: Path) -> Path:
    """An HDF5 file that is not an AnnData: a gene-embedding table under an .h5ad name."""
    shutil.copyfile(REFERENCE_DIR / GENE_TABLE, dest)
    return dest


@pytest.mark.parametrize(
    ("name", "make", "words"),
    [
        ("cells.h5ad", text_file, ["cells.h5ad", "not an HDF5 file"]),
        (
            "cells.h5ad",
            lambda p: truncated(REFERENCE_INPUT, p),
            ["cells.h5ad", f"truncated ({INPUT_BYTES // 2} of {INPUT_BYTES} bytes)"],
        ),
        ("cells.h5ad", folder, ["cells.h5ad is a folder", "pass the file itself"]),
        ("cells.h5ad", not_anndata, ["cells.h5ad is not a readable AnnData", "no obs data frame"]),
        ("cells.zarr", folder, ["cells.zarr is not an AnnData .zarr store"]),
        ("cells.h5", text_file, ["cells.h5 as a 10x .h5 file", "not an HDF5 file"]),
        ("cells.h5", lambda p: truncated(TENX_HUMAN, p), ["cells.h5 as a 10x .h5 file", "truncated"]),
    ],
    ids=["text-h5ad", "truncated-h5ad", "folder-h5ad", "hdf5-not-anndata", "empty-zarr", "text-10x", "truncated-10x"],
)
def test_unreadable_data_file(capsys, tmp_path, name, make, words):
    data = make(tmp_path / name)
    code, err = inference(capsys, tmp_path, data)
    assert_one_line_error(code, err, "inference", *words)


def indices_out_of_range(matrix: h5py.Group) -> None:
    matrix["indices"][:] = 10**6


def test_a_10x_file_written_here_runs(tmp_path):
    """The baseline of the malformed files below: written correctly, it gives the reference cells' embeddings."""
    data = reference_10x(tmp_path)
    out = tmp_path / "out"
    assert (
        main(
            ["inference", "--checkpoint-path", str(REFERENCE_DIR), "--data-file", str(data), "--output-path", str(out)]
        )
        == 0
    )
    assert ad.read_h5ad(out / "embeddings.h5ad").n_obs == 64


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (remove("indptr", "features/feature_type"), ["malformed 10x .h5 file", "lacks indptr, features/feature_type"]),
        (replace("shape", np.array([5, 64], dtype=np.int32)), ["malformed 10x .h5 file", "matrix/shape is [5, 64]"]),
        (replace("indptr", np.arange(65, dtype=np.int64)), ["malformed 10x .h5 file", "matrix/indptr does not index"]),
        (indices_out_of_range, ["malformed 10x .h5 file", "matrix/indices of barcodes 0-63 point outside"]),
    ],
    ids=["missing-tables", "wrong-shape", "wrong-indptr", "indices-out-of-range"],
)
def test_malformed_10x_file_is_named(capsys, tmp_path, change, words):
    data = reference_10x(tmp_path, change)
    code, err = inference(capsys, tmp_path, data)
    assert_one_line_error(code, err, "inference", str(data), *words)


def test_a_file_without_matrix_group_is_not_10x(capsys, tmp_path):
    data = tmp_path / "table.h5"
    shutil.copyfile(REFERENCE_DIR / GENE_TABLE, data)
    code, err = inference(capsys, tmp_path, data)
    assert_one_line_error(code, err, "inference", "table.h5 is not a Cell Ranger v3 .h5 file", "convert it")


def empty(original: Path, path: Path) -> Path:
    path.write_bytes(b"")
    return path


def text(original: Path, path: Path) -> Path:
    return text_file(path)


def half(original: Path, path: Path) -> Path:
    return truncated(original, path)


def directory(original: Path, path: Path) -> Path:
    return folder(path)


def without_keys(original: Path, path: Path) -> Path:
    with h5py.File(original) as source, h5py.File(path, "w") as f:
        source.copy("arrays", f)
    return path


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (empty, ["cannot read model weights", "empty, truncated", "download the checkpoint again"]),
        (text, ["cannot read model weights", "of another format"]),
        (directory, ["model_weights.pt is a folder"]),
        (half, ["cannot read model weights", "truncated"]),
    ],
    ids=["empty", "text", "folder", "truncated"],
)
def test_broken_weights_file(capsys, tmp_path, make, words):
    checkpoint = checkpoint_with(tmp_path, "model_weights.pt", make)
    code, err = inference(capsys, tmp_path, REFERENCE_INPUT, checkpoint)
    assert_one_line_error(code, err, "inference", str(checkpoint), *words)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (text, ["as a gene-embedding .h5 file", "not an HDF5 file"]),
        (half, ["as a gene-embedding .h5 file", "truncated"]),
        (directory, ["is a folder, not a gene-embedding .h5 file"]),
        (without_keys, ["is not a gene-embedding .h5 file: expected a dataset 'keys' and a group 'arrays'"]),
    ],
    ids=["text", "truncated", "folder", "no-keys"],
)
def test_broken_gene_embedding_files(capsys, tmp_path, make, words):
    checkpoint = checkpoint_with(tmp_path, GENE_TABLE, make)
    code, err = inference(capsys, tmp_path, REFERENCE_INPUT, checkpoint)
    assert_one_line_error(code, err, "inference", "mus_musculus_gene.h5", *words)
    table = make(REFERENCE_DIR / GENE_TABLE, tmp_path / "frog_gene.h5")
    code, err = inference(capsys, tmp_path, REFERENCE_INPUT, REFERENCE_DIR, "--pretrained-embedding", table)
    assert_one_line_error(code, err, "inference", "frog_gene.h5", *words)


@pytest.mark.parametrize("make", [text_file, lambda p: truncated(REFERENCE_INPUT, p)], ids=["text", "truncated"])
def test_finetune_on_a_corrupt_h5ad(capsys, tmp_path, make):
    cells = make(tmp_path / "cells.h5ad")
    adapters = tmp_path / "adapters"
    code, err = run_cli(
        capsys,
        "finetune",
        "--checkpoint-path",
        REFERENCE_DIR,
        "--train-files",
        cells,
        "--output-path",
        adapters,
        "--device",
        "cpu",
        "--max-steps",
        "1",
    )
    assert_one_line_error(code, err, "finetune", "cells.h5ad", "as an AnnData .h5ad file")
    assert not (adapters / "adapter_model.safetensors").exists()


def test_finetune_with_flex_attention_on_the_cpu(capsys, tmp_path):
    adapters = tmp_path / "adapters"
    args = ["--checkpoint-path", REFERENCE_DIR, "--train-files", REFERENCE_INPUT, "--output-path", adapters]
    code, err = run_cli(capsys, "finetune", *args, "--device", "cpu", "--attention-backend", "flex")
    assert_one_line_error(code, err, "finetune", "flex attention backend cannot train on the CPU", "chunked")
    assert not adapters.exists()


def test_train_on_a_corrupt_h5ad(capsys, tmp_path):
    cells = truncated(REFERENCE_INPUT, tmp_path / "cells.h5ad")
    output = tmp_path / "model"
    code, err = run_cli(
        capsys, "train", "--config", TRAIN_CONFIG, *tiny_train_overrides(output, f"data.train_files=[{cells}]")
    )
    assert_one_line_error(code, err, "train", "cells.h5ad", "truncated")
    assert not (output / "model_weights.pt").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--retries", "0"], ["--retries: must be at least 1, got 0"]),
        (["--timeout", "0"], ["--timeout: must be above 0"]),
        (["--max-expansion", "-1"], ["--max-expansion: must be above 0"]),
    ],
    ids=["retries", "timeout", "max-expansion"],
)
def test_download_flags_out_of_range(capsys, tmp_path, args, words):
    with LocalServer() as server:
        base = ["--checkpoint-dir", tmp_path / "ckpt", "--base-url", server.base_url]
        code, err = run_cli(capsys, "download", "tf-sapiens", *base, *args)
    assert_one_line_error(code, err, "download", *words, exit_code=2)
    assert server.requests == [] and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    ("args", "words"), [(["--max-retries", "0"], ["--max-retries"]), (["--workers", "0"], ["--workers"])]
)
def test_download_data_flags_out_of_range(capsys, tmp_path, args, words):
    with LocalServer() as server:
        base = ["--species", "homo sapiens", "--api-url", server.base_url, "--output-dir", tmp_path / "out"]
        code, err = run_cli(capsys, "download-data", *base, *args)
    assert_one_line_error(code, err, "download-data", *words, "must be at least 1, got 0", exit_code=2)
    assert server.requests == [] and not (tmp_path / "out").exists()


def test_checkpoint_dir_that_is_a_file(capsys, tmp_path):
    not_a_folder = text_file(tmp_path / "checkpoints")
    with LocalServer() as server:
        code, err = run_cli(
            capsys, "download", "tf-sapiens", "--checkpoint-dir", not_a_folder, "--base-url", server.base_url
        )
    assert_one_line_error(code, err, "download", "checkpoints is a file, not a folder", "--checkpoint-dir")
    assert server.requests == []
    assert not_a_folder.read_text().startswith("cell,gene")


@pytest.mark.parametrize("digest", ["abc", "g" * 64, "0" * 63, "0" * 65])
def test_sha256_that_is_not_64_hex_digits_is_refused_before_downloading(capsys, tmp_path, digest):
    with LocalServer() as server:
        server.add("/tf_sapiens.tar.gz", b"never fetched")
        code, err = run_cli(
            capsys,
            "download",
            "tf-sapiens",
            "--checkpoint-dir",
            tmp_path,
            "--base-url",
            server.base_url,
            "--sha256",
            digest,
        )
    assert_one_line_error(code, err, "download", "--sha256", repr(digest), "not 64 hexadecimal digits")
    assert server.requests == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "flag", "value", "words"),
    [
        ("inference", "--batch-size", "0", "must be at least 1, got 0"),
        ("inference", "--chunk-size", "0", "must be at least 1, got 0"),
        ("inference", "--max-tokens-per-batch", "-5", "must be at least 1, got -5"),
        ("inference", "--n-data-workers", "-1", "must be at least 0, got -1"),
        ("finetune", "--batch-size", "0", "must be at least 1, got 0"),
        ("finetune", "--lora-r", "0", "must be at least 1, got 0"),
        ("finetune", "--accumulate-grad-batches", "0", "must be at least 1, got 0"),
        ("finetune", "--n-data-workers", "-1", "must be at least 0, got -1"),
    ],
)
def test_counts_out_of_range_name_the_flag(capsys, tmp_path, command, flag, value, words):
    """Checked by argparse before anything loads; the message names the flag, not the setting behind it."""
    data_flag = "--data-file" if command == "inference" else "--train-files"
    out = tmp_path / "out"
    code, err = run_cli(
        capsys,
        command,
        "--checkpoint-path",
        REFERENCE_DIR,
        data_flag,
        REFERENCE_INPUT,
        "--output-path",
        out,
        flag,
        value,
    )
    assert_one_line_error(code, err, command, f"{flag}: {words}", exit_code=2)
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "flag", "python_name"),
    [
        (["inference", "--data-file", REFERENCE_INPUT, "--num-gpus", "0"], "--num-gpus", "num_gpus"),
        (["finetune", "--train-files", REFERENCE_INPUT, "--val-fraction", "2"], "--val-fraction", "val_fraction"),
    ],
)
def test_errors_name_settings_by_their_flags(capsys, tmp_path, argv, flag, python_name):
    command, *rest = argv
    code = main([command, "--checkpoint-path", str(REFERENCE_DIR), *map(str, rest), "--output-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, command, f"{flag} must be")
    assert python_name not in err


def test_the_library_names_parameters_and_the_command_line_names_flags(reference_model, tmp_path, capsys):
    """A Python user reads the parameter (``max_genes``), the user of a command its flag (``--num-gpus``)."""
    with pytest.raises(ValueError, match=r"^max_genes must be >= 1 and <= 1000000, got 0$"):
        reference_model.generate(max_genes=0, num_cells=1, library_size=100.0)
    with pytest.raises(ValueError, match=r"^num_gpus must be >= 1 \(or -1: every visible GPU\), got 0$"):
        HardwareConfig(num_gpus=0)
    code, err = run_cli(
        capsys, "inference", "--checkpoint-path", REFERENCE_DIR, "--data-file", REFERENCE_INPUT,
        "--output-path", tmp_path, "--num-gpus", "0",
    )  # fmt: skip
    assert_one_line_error(code, err, "inference", "--num-gpus must be >= 1 (or -1: every visible GPU), got 0")
    assert "num_gpus" not in err
    assert_no_output(tmp_path)


def test_a_dry_run_names_the_parameter_in_python_and_the_flag_on_the_command_line(tmp_path, capsys):
    (tmp_path / "embeddings.h5ad").write_text("an earlier output")
    settings = RunConfig.from_checkpoint(REFERENCE_DIR, data_files=[str(REFERENCE_INPUT)], output_path=str(tmp_path))
    run_task(EmbedTask(), settings, dry_run=True)
    assert "(exists; the run would stop: pass `overwrite=True` to replace it)" in capsys.readouterr().out
    argv = ["inference", "--checkpoint-path", REFERENCE_DIR, "--data-file", REFERENCE_INPUT, "--output-path", tmp_path]
    assert main([*map(str, argv), "--dry-run"]) == 0
    assert "(exists; the run would stop: pass --overwrite to replace it)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("message", "worded"),
    [
        ("pass `overwrite=True` to replace it", "pass --overwrite to replace it"),
        ("run without `resume` to start over", "run without --resume to start over"),
        ("or pass `invalid_counts='drop'`", "or pass --invalid-counts drop"),
        ("pass `filter_to_vocabs=False`", "pass --no-filter-to-vocabs"),
        ("`num_gpus=4` asks for 4 GPUs", "--num-gpus 4 asks for 4 GPUs"),
        ("max_tokens must be >= 1, got 0", "--max-tokens must be >= 1, got 0"),
        ("give files with data_files", "give files with --data-file"),
        # Ordinary words, names without a flag and dotted keys stay as they are.
        ("the run would resume on this device, at the same precision", None),
        ("set `normalize_to_scale` with an override", None),
        ("model.inference_config.batch_size=0: must be >= 1", None),
        ("predict.batch_size=0: must be >= 1", None),
        ("/data/output_path/cells.h5ad is missing", None),
    ],
)
def test_flags_replace_only_the_parameters_a_message_marks_or_whose_names_have_an_underscore(message, worded):
    inference = subcommand_parser(build_parser(["inference"]), "inference")
    assert with_flag_names(message, inference) == (worded or message)


@pytest.mark.parametrize("command", ["inference", "generate", "predict-labels", "perturb"])
@pytest.mark.parametrize("name", ["../escaped.h5ad", "sub/out.h5ad", ".."])
def test_an_output_file_name_cannot_leave_the_output_folder(tmp_path, capsys, command, name):
    """``--output-filename`` is a name in ``--output-path``: a path in it would write elsewhere."""
    folder = tmp_path / "a" / "b"
    code, err = run_cli(
        capsys, command, "--checkpoint-path", REFERENCE_DIR, "--data-file", REFERENCE_INPUT,
        "--output-path", folder, "--output-filename", name,
    )  # fmt: skip
    assert_one_line_error(code, err, command, f"--output-filename {name!r} is not a file name", "--output-path")
    assert not list(tmp_path.rglob("*.h5ad"))


# Mistakes in the arguments of each command (argparse's usage errors aside), with words of the one-line message.
CHECKPOINT = ["--checkpoint-path", REFERENCE_DIR]
RUN = [*CHECKPOINT, "--data-file", REFERENCE_INPUT]
ARGUMENT_MISTAKES = [
    (["inference", *RUN, "--config-override", "model.inference_config.batch_size=0"], "batch_size must be >= 1"),
    (["inference", *RUN, "--disable-compile-block-mask", "--attention-backend", "flex"], "drop one of the two"),
    (["score", *RUN, "--output-keys", "embeddings"], "add mean_log_likelihood"),
    (["perturb", *RUN], "nothing to perturb"),
    (["perturb", *RUN, "--knock-out", "Gad2", "--output-keys", "embeddings"], "leave --output-keys"),
    (["screen", *RUN, "--knock-out", "all", "--output-keys", "embeddings"], "leave --output-keys"),
    (["predict-labels", *RUN], "needs a classifier"),
    (["annotate", *RUN, "--reference", REFERENCE_INPUT], "give --label-key"),
    (["generate", *CHECKPOINT, "--num-cells", "3"], "give --library-size"),
    (["finetune", *CHECKPOINT, "--train-files", REFERENCE_INPUT], "--output-path is required"),
    (
        ["finetune", *CHECKPOINT, "--task", "classify", "--train-files", REFERENCE_INPUT, "--output-path", "out"],
        "--label-key",
    ),
    (["train"], "no training file given"),
    (["evaluate", "--data-file", REFERENCE_INPUT, "--label-key", "cell_type", "--seed", "-1"], "--seed must be"),
    (["download", "all", "--sha256", "0" * 64], "--sha256 applies to a single model"),
]


def test_argument_mistakes_are_reported_before_torch_loads(tmp_path):
    """Every command refuses its arguments before it imports torch, Lightning or peft: the answer comes at once.

    One fresh interpreter runs the commands one after another and records, after each, which heavy libraries are
    imported (the first command that imports one is the one at fault).
    """
    argvs = [[str(arg) for arg in argv] for argv, _ in ARGUMENT_MISTAKES]
    code = (
        "import contextlib, io, json, sys\n"
        "from transcriptformer.cli import main\n"
        f"for argv in {argvs!r}:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            code = main(argv)\n"
        "        except SystemExit as exit_:\n"
        "            code = exit_.code\n"
        "    heavy = [m for m in ('torch', 'lightning', 'peft') if m in sys.modules]\n"
        "    print(json.dumps({'code': code, 'err': err.getvalue(), 'heavy': heavy}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == len(argvs), result.stdout[-2000:]
    for argv, (_, words), answer in zip(argvs, ARGUMENT_MISTAKES, answers, strict=True):
        assert_one_line_error(answer["code"], answer["err"], argv[0], words)
        assert answer["heavy"] == [], f"transcriptformer {' '.join(argv)} imported {answer['heavy']} before its error"
    assert list(tmp_path.iterdir()) == []  # nothing written
