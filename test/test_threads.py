"""torch's CPU threads: OMP_NUM_THREADS when set, else no more than the idle CPUs this process may use."""

import os
import subprocess
import sys
import time

import anndata as ad
import pytest
import torch

from transcriptformer.cli import main
from transcriptformer.runtime import cpu_threads, default_threads, idle_cpus, requested_threads, usable_cpus


@pytest.mark.parametrize(
    ("environ", "threads"),
    [
        ({}, None),
        ({"OMP_NUM_THREADS": "3"}, 3),
        ({"OMP_NUM_THREADS": " 4,2 "}, 4),  # OpenMP's nested list: the outer level is torch's
        ({"MKL_NUM_THREADS": "2"}, 2),
        ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "2"}, 1),
        ({"OMP_NUM_THREADS": ""}, None),
    ],
)
def test_requested_threads(environ, threads):
    assert requested_threads(environ) == threads


@pytest.mark.parametrize("value", ["abc", "0", "-1", "2.5"])
def test_a_wrong_thread_variable_names_the_fix(value):
    with pytest.raises(ValueError, match=f"OMP_NUM_THREADS='{value}' is not a thread count: set it to a whole number"):
        cpu_threads(environ={"OMP_NUM_THREADS": value})


def test_default_threads_leave_no_cpu_oversubscribed():
    assert default_threads(usable=8, idle=8.0) == 8
    assert default_threads(usable=8, idle=7.6) == 8  # a load average of 0.4: daemons, not a competing job
    assert default_threads(usable=8, idle=5.2) == 5  # three busy CPUs
    assert default_threads(usable=8, idle=-3.0) == 1  # more runnable processes than CPUs
    assert default_threads(usable=2, idle=64.0) == 2  # an idle machine, but a container of 2 CPUs
    assert default_threads(usable=8, idle=8.0, reserved=2) == 6  # the data-reading threads keep two
    assert default_threads(usable=8, idle=8.0, processes=3) == 2
    assert default_threads(usable=2, idle=2.0, reserved=1, processes=2) == 1


def test_this_machine():
    usable = usable_cpus()
    assert 1 <= usable <= os.cpu_count()
    assert idle_cpus() <= os.cpu_count()
    assert 1 <= cpu_threads(environ={}) <= usable
    assert cpu_threads(environ={"OMP_NUM_THREADS": str(usable + 1)}) == usable + 1  # asked for: never overruled


def test_a_busy_process_takes_its_cpu_off_the_idle_ones():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        idle_cpus()  # opens a window in which the spinner runs throughout
        assert idle_cpus() <= os.cpu_count() - 0.5
    finally:
        spinner.kill()
        spinner.wait()


def test_this_process_own_work_is_not_counted_as_busy():
    idle_cpus()
    started, before = time.perf_counter(), os.times()
    while time.perf_counter() < started + 0.3:  # this process keeps a CPU busy for the whole window
        pass
    spent = sum(os.times()[:2]) - sum(before[:2])
    idle = idle_cpus()
    # What this process ran counts as idle: at least its share of the window stays idle (less the clock-tick rounding).
    assert idle >= spent / (time.perf_counter() - started) - 0.1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is a Linux call")
def test_cpu_affinity_limits_the_threads():
    script = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from transcriptformer.runtime import cpu_threads, usable_cpus; "
        "print(usable_cpus(), cpu_threads(environ={}), cpu_threads(environ={'OMP_NUM_THREADS': '2'}))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "1", "2"]


def run_inference(tmp_path, reference_dir, reference_input, monkeypatch, environ, *flags) -> int:
    """``transcriptformer inference`` in this process, with only ``environ`` of the thread variables set."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    command = ["inference", "--checkpoint-path", str(reference_dir), "--data-file", str(reference_input)]
    return main([*command, "--output-path", str(tmp_path), *flags])


@pytest.mark.parametrize("threads", [1, 2])
def test_inference_runs_with_omp_num_threads(tmp_path, reference_dir, reference_input, monkeypatch, capsys, threads):
    assert run_inference(tmp_path, reference_dir, reference_input, monkeypatch, {"OMP_NUM_THREADS": str(threads)}) == 0
    assert f"on cpu (1 process, {threads} CPU thread{'s' * (threads > 1)})" in capsys.readouterr().out
    assert ad.read_h5ad(tmp_path / "embeddings.h5ad").uns["transcriptformer"]["cpu_threads"] == threads


def test_a_command_leaves_torch_threads_as_it_found_them(tmp_path, reference_dir, reference_input, monkeypatch):
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    assert run_inference(tmp_path, reference_dir, reference_input, monkeypatch, {"OMP_NUM_THREADS": str(wanted)}) == 0
    assert ad.read_h5ad(tmp_path / "embeddings.h5ad").uns["transcriptformer"]["cpu_threads"] == wanted
    assert torch.get_num_threads() == before


def test_inference_leaves_a_cpu_to_each_data_reading_thread(tmp_path, reference_dir, reference_input, monkeypatch):
    flags = ("--n-data-workers", "1", "--device", "cpu")
    assert run_inference(tmp_path, reference_dir, reference_input, monkeypatch, {}, *flags) == 0
    threads = ad.read_h5ad(tmp_path / "embeddings.h5ad").uns["transcriptformer"]["cpu_threads"]
    assert 1 <= threads <= max(1, usable_cpus() - 1)


def test_inference_refuses_a_wrong_omp_num_threads(tmp_path, reference_dir, reference_input, monkeypatch, capsys):
    assert run_inference(tmp_path, reference_dir, reference_input, monkeypatch, {"OMP_NUM_THREADS": "all"}) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "transcriptformer inference: error: OMP_NUM_THREADS='all' is not a thread count: "
        "set it to a whole number >= 1, or unset it"
    )
    assert not (tmp_path / "embeddings.h5ad").exists()
