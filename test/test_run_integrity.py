"""Inference runs keep their output whole (issue 11), whatever happens around them.

Concurrent runs, resume checks, the output's location, saved units that are damaged, float16 counts, files left
by killed runs, and a full disk.

Every case runs the real command on the reference checkpoint and cells, with files generated here from them, and
checks the exit code, that no traceback is printed, the message's key words, and that no output that looks
complete is written. Runs that need a process of their own (held locks, file-size limits, fewer privileges) are
subprocesses; the others call the command's ``main`` in this process.
"""

import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.cli import main
from transcriptformer.model.lora import ADAPTER_WEIGHTS_FILE, add_lora_adapters, save_adapters
from transcriptformer.training.config import LoraConfig

OUTPUT = "embeddings.h5ad"
PARTS = f".{OUTPUT}.parts"
N_UNITS = 8  # the 64 reference cells in units of 8
# Largest file a run may write to leave an interrupted run: each unit file (7-12 kB) fits, the output does not.
UNITS_FIT = 40_000
# Largest file a run may write for a disk that fills while units are saved: the manifest fits, no unit file does.
NO_UNIT_FITS = 5_000


def arguments(reference_dir, output: Path, *extra, data=None) -> list[str]:
    data = data or reference_dir / "input.h5ad"
    return [
        "inference", "--checkpoint-path", str(reference_dir), "--data-file", str(data), "--output-path", str(output),
        "--output-keys", "embeddings", "llh", "mu", "--chunk-size", "8", *extra,
    ]  # fmt: skip


def run_here(capsys, args: list[str]) -> tuple[int, str, str]:
    """The command in this process: exit code, stdout, stderr."""
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_apart(args: list[str], max_file_size: int | None = None, preexec_fn=None) -> tuple[int, str, str]:
    """The command in a process of its own, whose files may not grow past ``max_file_size`` bytes when given."""
    if max_file_size is not None:
        preexec_fn = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_size, max_file_size))  # noqa: E731
    command = [sys.executable, "-m", "transcriptformer", *args]
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=preexec_fn)
    return done.returncode, done.stdout, done.stderr


def assert_fails_cleanly(run: tuple[int, str, str], *words: str) -> str:
    """Exit code 1, no traceback, one error line holding ``words``; returns that line."""
    code, out, err = run
    assert code == 1, err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("transcriptformer inference: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def complete(reference_dir, tmp_path_factory) -> ad.AnnData:
    """The output of an uninterrupted run, to compare with."""
    output = tmp_path_factory.mktemp("complete")
    assert main(arguments(reference_dir, output)) == 0
    return ad.read_h5ad(output / OUTPUT)


def assert_same_outputs(written: Path, complete: ad.AnnData) -> None:
    adata = ad.read_h5ad(written)
    assert list(adata.obs_names) == list(complete.obs_names)
    np.testing.assert_array_equal(adata.obsm["X_transcriptformer"], complete.obsm["X_transcriptformer"])
    np.testing.assert_array_equal(adata.obs["llh"], complete.obs["llh"])
    assert (adata.layers["mu"] != complete.layers["mu"]).nnz == 0


def interrupt(args: list[str], parts: Path) -> None:
    """Leave an interrupted run: every unit saved, the merge stopped by a file-size limit (see the disk-full test)."""
    code, _, err = run_apart(args, max_file_size=UNITS_FIT)
    assert code == 1 and "File too large" in err, err
    assert len(list(parts.glob("unit-*.npz"))) == N_UNITS


# --- concurrent runs --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_the_same_output_fails_at_once(reference_dir, many_cells, tmp_path):
    """Two runs writing one output would mix two runs' units into one file: the second stops before loading."""
    first_args = arguments(reference_dir, tmp_path, "--batch-size", "1", data=many_cells)
    first = subprocess.Popen(
        [sys.executable, "-m", "transcriptformer", *first_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / PARTS).glob("unit-*.npz")) and first.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it was caught running"
        os.killpg(first.pid, signal.SIGSTOP)  # paused, holding its lock, however fast the machine
        second = run_apart(arguments(reference_dir, tmp_path, "--output-keys", "embeddings"))
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert_fails_cleanly(
        second, f"{tmp_path / OUTPUT} is being written by another run (pid {first.pid})", "wait for it to end"
    )
    assert "Running" not in second[1]  # it stopped before loading the model
    assert not (tmp_path / OUTPUT).exists()

    # The killed run's lock went with it: a resume gets past the lock (and names the setting it would change).
    resumed = run_apart(arguments(reference_dir, tmp_path, "--resume", "--clip-counts", "5", data=many_cells))
    assert_fails_cleanly(resumed, "had other settings", "setting model.data_config.clip_counts")
    assert (tmp_path / PARTS).is_dir()


# --- resume checks the contents of the weights it reads ---------------------------------------------------------


def rewrite_keeping_size_and_mtime(path: Path, rewrite) -> None:
    """Change a file's contents in place, keeping its size and modification time: only its contents tell."""
    before = path.stat()
    rewrite(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


@pytest.mark.slow  # an interrupted run in a process of its own (22 s on two busy cores)
def test_resume_refuses_an_adapter_changed_in_place(reference_dir, tmp_path, capsys):
    adapter = save_adapters(
        add_lora_adapters(load_checkpoint(reference_dir).model, LoraConfig(r=4), str(reference_dir)),
        tmp_path / "adapter",
    )
    args = arguments(reference_dir, tmp_path / "out", "--adapter", str(adapter))
    interrupt(args, tmp_path / "out" / PARTS)
    saved = files_under(tmp_path / "out")

    def shift_lora_weights(path):
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        weights = load_file(path)
        save_file({name: t + 1 if "lora_B" in name else t for name, t in weights.items()}, path, metadata)

    rewrite_keeping_size_and_mtime(adapter / ADAPTER_WEIGHTS_FILE, shift_lora_weights)
    assert_fails_cleanly(
        run_here(capsys, [*args, "--resume"]),
        "had other settings, inputs or weights; run without --resume to start over",
        f"contents of {(adapter / ADAPTER_WEIGHTS_FILE).resolve()}",
    )
    assert files_under(tmp_path / "out") == saved  # the interrupted run's units are kept, no output


def test_resume_refuses_a_gene_embedding_table_changed_in_place(reference_dir, tmp_path, capsys):
    table = Path(shutil.copy(reference_dir / "vocabs" / "mus_musculus_gene.h5", tmp_path / "table.h5"))
    args = arguments(reference_dir, tmp_path / "out", "--pretrained-embedding", str(table))
    interrupt(args, tmp_path / "out" / PARTS)
    saved = files_under(tmp_path / "out")

    def change_one_row(path):
        with h5py.File(path, "r+") as f:
            rows = f["arrays"][next(iter(f["arrays"]))]
            rows[0] = rows[0] + 1

    rewrite_keeping_size_and_mtime(table, change_one_row)
    assert_fails_cleanly(run_here(capsys, [*args, "--resume"]), "had other settings", f"contents of {table.resolve()}")
    assert files_under(tmp_path / "out") == saved


# --- the output's location, checked before anything is computed ------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "output", "extra", "words"),
    [
        ({"file": b"notes"}, "file", [], ["--output-path", "file is not a folder", "is a file"]),
        ({"file": b"notes"}, "file/below", [], ["--output-path", "below is not a folder", "file is a file"]),
        ({f"out/{OUTPUT}/kept": b"x"}, "out", [], ["is a folder, not a file", "--output-filename"]),
        ({f"out/{OUTPUT}/kept": b"x"}, "out", ["--overwrite"], ["is a folder, not a file", "--output-filename"]),
    ],
    ids=["output-path-is-a-file", "output-path-under-a-file", "output-is-a-folder", "output-is-a-folder-overwrite"],
)
def test_output_location_is_checked_before_computing(reference_dir, tmp_path, capsys, layout, output, extra, words):
    for name, content in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    run = run_here(capsys, arguments(reference_dir, tmp_path / output, *extra))
    assert_fails_cleanly(run, *words)
    assert "Running" not in run[1]
    assert files_under(tmp_path) == layout  # nothing written, nothing removed


def drop_root_file_access() -> None:
    """Before exec: as root, give up the capabilities that let root write anywhere, so that file modes apply."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.skipif(sys.platform == "win32", reason="folder modes do not stop writes on Windows")
@pytest.mark.parametrize(("below", "words"), [("", "cannot write in"), ("new", "cannot create")])
def test_unwritable_output_folder_is_refused_before_computing(reference_dir, tmp_path, below, words):
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o555)
    try:
        done = run_apart(arguments(reference_dir, readonly / below), preexec_fn=drop_root_file_access)
    except subprocess.SubprocessError:
        pytest.skip("running as root without the capability to drop root's file access")
    finally:
        readonly.chmod(0o755)
    assert_fails_cleanly(done, words, "Permission denied", "--output-path")
    assert "Running" not in done[1]
    assert list(readonly.iterdir()) == []


# --- saved units that are damaged --------------------------------------------------------------------------------


def flip_a_byte_inside_an_array(part: Path) -> None:
    """Damage the largest array of a unit file, leaving its zip directory and its cell count readable."""
    with zipfile.ZipFile(part) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    content = bytearray(part.read_bytes())
    header = member.header_offset  # local header: 30 bytes, then the name and the extra field
    start = header + 30 + int.from_bytes(content[header + 26 : header + 28], "little")
    start += int.from_bytes(content[header + 28 : header + 30], "little")
    content[start + member.compress_size // 2] ^= 0xFF
    part.write_bytes(bytes(content))


def test_damaged_units_are_named_with_the_fix(reference_dir, tmp_path, capsys, complete):
    """Truncated or emptied unit files are found when the resume starts; one damaged inside, when it is merged."""
    parts = tmp_path / PARTS
    args = arguments(reference_dir, tmp_path, "--resume")
    interrupt(args[:-1], parts)
    truncated, emptied, flipped = (parts / f"unit-00000{i}.npz" for i in (2, 5, 3))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    emptied.write_bytes(b"")
    flip_a_byte_inside_an_array(flipped)
    saved = files_under(tmp_path)

    run = run_here(capsys, args)
    line = assert_fails_cleanly(
        run, "unit-000002.npz", "unit-000005.npz", "are damaged", "delete those files and rerun with --resume"
    )
    assert flipped.name not in line  # its zip directory and cell count are sound: found at the merge
    assert "Resuming" not in run[1]  # found before running anything
    assert files_under(tmp_path) == saved

    truncated.unlink()
    emptied.unlink()
    run = run_here(capsys, args)
    assert_fails_cleanly(run, flipped.name, "cannot read a saved unit", "delete it and rerun with --resume")
    assert f"Resuming: {N_UNITS - 2} of {N_UNITS} units were already done" in run[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{OUTPUT}.lock", PARTS]  # no output, no temporary file

    flipped.unlink()
    code, out, err = run_here(capsys, args)
    assert code == 0, err
    assert f"Resuming: {N_UNITS - 1} of {N_UNITS} units were already done" in out  # 2 and 5 were computed again
    assert_same_outputs(tmp_path / OUTPUT, complete)


# --- float16 counts ------------------------------------------------------------------------------------------------


def write_float16(source: Path, target: Path, layout: str) -> Path:
    """The cells of ``source`` with float16 counts: a dense matrix, or CSR / CSC with float16 values."""
    adata = ad.read_h5ad(source)
    if layout == "dense":
        adata.X = adata.X.toarray().astype(np.float16)
        adata.write_h5ad(target)
        return target
    adata.X = sp.csr_matrix(adata.X) if layout == "csr" else sp.csc_matrix(adata.X)
    adata.write_h5ad(target)
    with h5py.File(target, "r+") as f:  # scipy.sparse holds no float16: write the values as other tools do
        values = f["X/data"][:]
        del f["X/data"]
        f["X/data"] = values.astype(np.float16)
    return target


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_float16_counts_are_read_as_float32(reference_dir, reference_input, tmp_path, capsys, complete, layout):
    data = write_float16(reference_input, tmp_path / "half.h5ad", layout)
    assert ad.read_h5ad(reference_input).X.max() <= 2048  # integers that float16 holds exactly
    code, out, err = run_here(capsys, arguments(reference_dir, tmp_path / "out", data=data))
    assert code == 0, err
    assert "--resume" not in out + err
    assert_same_outputs(tmp_path / "out" / OUTPUT, complete)


def test_float16_csc_counts_are_a_clear_error(reference_dir, reference_input, tmp_path, capsys):
    data = write_float16(reference_input, tmp_path / "half.h5ad", "csc")
    run = run_here(capsys, arguments(reference_dir, tmp_path / "out", data=data))
    assert_fails_cleanly(run, str(data), "float16 CSC", "astype('float32').tocsr()")
    assert "--resume" not in run[1] + run[2]
    assert not (tmp_path / "out" / OUTPUT).exists()


# --- what a run killed while writing the output left ---------------------------------------------------------------


def test_temporary_files_of_killed_runs_are_removed(reference_dir, reference_input, tmp_path, capsys):
    """A run killed while writing leaves ``.<stem>.<pid>.tmp.h5ad``; the next run on that output deletes it."""
    stem = Path(OUTPUT).stem
    left = tmp_path / f".{stem}.4242.tmp.h5ad"
    left.write_bytes(reference_input.read_bytes()[:4096])  # a partly written HDF5 file
    others = [tmp_path / f".{stem}.old.tmp.h5ad", tmp_path / ".other.4242.tmp.h5ad", tmp_path / f"{stem}.4242.h5ad"]
    for other in others:
        other.write_bytes(b"not ours")
    code, out, err = run_here(capsys, arguments(reference_dir, tmp_path))
    assert code == 0, err
    assert f"Removed {left}" in out
    assert not left.exists()
    assert all(other.read_bytes() == b"not ours" for other in others)
    assert ad.read_h5ad(tmp_path / OUTPUT).n_obs == 64


# --- a full disk ---------------------------------------------------------------------------------------------------


def test_full_disk_while_writing_keeps_the_previous_output_and_the_units(reference_dir, tmp_path, capsys, complete):
    """The disk fills while the output is written: the previous output stays as it was, the units resume.

    The disk is filled by a file-size limit (``RLIMIT_FSIZE``) on the run's process: a write that would grow a file
    past it fails at the write call with ``EFBIG`` ("File too large"), as a full disk fails it with ``ENOSPC`` or a
    quota with ``EDQUOT``. No filesystem has to be mounted (that needs root) and nothing in the package or in h5py is
    patched: HDF5 meets a real failing ``write(2)``, including the writes it makes when it closes the file. Each
    unit file fits under the limit, the merged output does not.
    """
    previous = tmp_path / OUTPUT
    assert main(arguments(reference_dir, tmp_path, "--output-keys", "embeddings")) == 0  # the last --output-keys
    before = previous.read_bytes()
    capsys.readouterr()

    assert_fails_cleanly(
        run_apart(arguments(reference_dir, tmp_path, "--overwrite"), max_file_size=UNITS_FIT),
        f"writing {previous} failed (File too large)",
        "nothing was replaced",
        f"the finished units are kept in {tmp_path / PARTS}",
        "rerun with --resume",
    )
    assert previous.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{OUTPUT}.lock", PARTS, OUTPUT]  # no temporary file
    assert len(list((tmp_path / PARTS).glob("unit-*.npz"))) == N_UNITS

    code, out, err = run_here(capsys, arguments(reference_dir, tmp_path, "--overwrite", "--resume"))
    assert code == 0, err
    assert f"Resuming: {N_UNITS} of {N_UNITS} units were already done" in out
    assert_same_outputs(previous, complete)


def test_full_disk_while_saving_units_leaves_no_partial_unit(reference_dir, tmp_path):
    assert_fails_cleanly(
        run_apart(arguments(reference_dir, tmp_path), max_file_size=NO_UNIT_FITS),
        "unit-000000.npz failed (File too large)",
        "rerun with --resume",
    )
    assert sorted(p.name for p in (tmp_path / PARTS).iterdir()) == ["run.json"]  # no partial unit file
    assert json.loads((tmp_path / PARTS / "run.json").read_text())["fingerprint"]
    assert not (tmp_path / OUTPUT).exists()


def test_a_stop_signal_waits_until_an_output_and_its_files_are_in_place():
    """SIGINT (as SIGTERM) while an output and its files are moved into place acts once they all are: never a mix."""
    from transcriptformer.engine.output import termination_deferred

    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    steps = []
    with pytest.raises(KeyboardInterrupt), termination_deferred():
        signal.raise_signal(signal.SIGINT)  # arrives between two moves
        steps.append("the last move")
    assert steps == ["the last move"]
    assert {number: signal.getsignal(number) for number in handlers} == handlers
