import importlib.metadata
import importlib.util
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "install_torch.py"
spec = importlib.util.spec_from_file_location("install_torch", SCRIPT)
install_torch = importlib.util.module_from_spec(spec)
sys.modules["install_torch"] = install_torch
spec.loader.exec_module(install_torch)

NVIDIA_SMI = """\
Tue Nov 12 10:01:22 2024
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  NVIDIA A100-SXM4-80GB          On  |   00000000:07:00.0 Off |                    0 |
+-----------------------------------------+------------------------+----------------------+
"""
NO_DRIVER = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."


def plan(cuda=None, cpu=False, torch=None, system="Linux"):
    return install_torch.make_plan(cuda, cpu, torch, system)


def test_cuda_version_is_read_from_nvidia_smi():
    assert install_torch.parse_cuda_version(NVIDIA_SMI) == "12.4"
    assert install_torch.parse_cuda_version(NVIDIA_SMI.replace("12.4", "13.0")) == "13.0"
    assert install_torch.parse_cuda_version(NO_DRIVER) is None


def test_release_table_is_one_consistent_line_per_entry():
    for release in install_torch.RELEASES:
        major, minor, patch = (int(x) for x in release.torch.split("."))
        # torchaudio 2.minor pairs with torch 2.minor; 2.11.1, one wheel for any torch >= 2.11, serves 2.12 on.
        assert release.torchaudio == release.torch or (minor >= 12 and release.torchaudio == "2.11.1")
        assert ("torchaudio" in release.any_build) == (release.torchaudio != release.torch)
        assert release.torchvision.startswith(f"0.{minor + 15}.")  # torchvision 0.(minor+15) pairs with torch 2.minor
        assert list(release.cuda) == sorted(release.cuda, key=install_torch.version_key)
    lines = [install_torch.version_key(r.torch) for r in install_torch.RELEASES]
    assert lines == sorted(lines, reverse=True)
    known = {r.line for r in install_torch.RELEASES}
    assert {"2.10", "2.11", "2.12", "2.13", "2.14"} <= known


def test_version_key_ignores_labels_and_suffixes():
    key = install_torch.version_key
    assert key("12.10") > key("12.9")
    assert key("2.14.1+cu130") == key("2.14.1") == key("2.14.1+cpu") == (2, 14, 1)
    assert key("2.15.0.dev20260901+cpu") == (2, 15, 0)
    assert key("2.14.0a0+gitc0ffee1") == (2, 14, 0)


@pytest.mark.parametrize(
    ("driver", "torch", "variant"),
    [
        ("13.2", "2.14.1", "cu132"),
        ("13.0", "2.14.1", "cu130"),
        ("12.9", "2.14.1", "cu126"),
        ("12.8", "2.14.1", "cu126"),
        ("12.6", "2.14.1", "cu126"),
        ("12.4", "2.6.0", "cu124"),  # newest torch with a CUDA 12 build the driver runs
        ("12.2", "2.5.1", "cu121"),
        ("12.0", "2.7.1", "cu118"),  # no CUDA 12 build old enough: newest torch with a runnable build
        ("11.8", "2.7.1", "cu118"),
    ],
)
def test_auto_choice_follows_the_driver(driver, torch, variant):
    chosen = plan(cuda=driver)
    assert (chosen.release.torch, chosen.variant) == (torch, variant)
    r = chosen.release
    audio_label = "" if "torchaudio" in r.any_build else f"+{variant}"
    assert chosen.requirements() == [
        f"torch=={r.torch}+{variant}",
        f"torchvision=={r.torchvision}+{variant}",
        f"torchaudio=={r.torchaudio}{audio_label}",
    ]
    assert chosen.command("python")[-2:] == ["--index-url", f"https://download.pytorch.org/whl/{variant}"]


def test_requested_release_line():
    assert plan(cuda="12.1", torch="2.5").variant == "cu121"
    assert plan(cuda="12.9", torch="2.6.0").variant == "cu126"
    assert plan(cpu=True, torch="2.7").requirements()[0] == "torch==2.7.1+cpu"
    assert plan(cuda="12.9", torch="2.11").variant == "cu128"
    assert plan(cuda="12.9", torch="2.10").requirements() == [
        "torch==2.10.0+cu128", "torchvision==0.25.0+cu128", "torchaudio==2.10.0+cu128"
    ]  # fmt: skip
    assert plan(cuda="13.2", torch="2.13").requirements() == [
        "torch==2.13.0+cu132", "torchvision==0.28.0+cu132", "torchaudio==2.11.1"
    ]  # fmt: skip


def test_cpu_and_macos_wheels():
    cpu = plan(cpu=True)
    assert cpu.command("py") == [
        "py", "-m", "pip", "install", "torch==2.14.1+cpu", "torchvision==0.29.1+cpu", "torchaudio==2.11.1",
        "--index-url", "https://download.pytorch.org/whl/cpu",
    ]  # fmt: skip
    assert plan() == cpu  # no NVIDIA driver and no flag: the CPU build, not a refusal
    assert plan(system="Windows") == cpu
    mac = plan(system="Darwin")
    assert mac.command("py") == [
        "py",
        "-m",
        "pip",
        "install",
        "torch==2.14.1",
        "torchvision==0.29.1",
        "torchaudio==2.11.1",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"cuda": "12.1", "torch": "2.9"},
            r"torch 2.9 has builds for CUDA 12.6, 12.8, 13.0; none runs .* CUDA 12.1 \(torch 2.7, 2.6, 2.5 would\)",
        ),
        ({"cuda": "11.2"}, "older than every build"),
        ({"cuda": "12.4", "torch": "2.4"}, r"torch 2.4 is not a release line this script knows \(known: 2.14, 2.13, "),
        ({"cuda": "12.4", "torch": "2.15"}, r"torch 2.15 is not a release line this script knows"),
        ({"cuda": "12.4", "system": "Darwin"}, "no CUDA builds for macOS"),
        ({"cuda": "12.4", "cpu": True}, "contradict"),
    ],
)
def test_inconsistent_requests_are_refused(kwargs, message):
    with pytest.raises(install_torch.InconsistentRequest, match=message):
        plan(**kwargs)


@pytest.mark.parametrize(
    ("installed", "expected"),
    [
        ({}, []),
        ({"torch": "2.13.0+cpu"}, []),
        ({"torch": "2.14.1"}, []),  # PyPI's CUDA build of the same release: replaced, not downgraded
        ({"torch": "2.14.0a0+gitc0ffee1"}, []),  # a source build before 2.14.0
        ({"torch": "2.15.0"}, ["this is a downgrade from torch 2.15.0 to torch 2.14.1+cpu"]),
        (
            {"torch": "2.15.0.dev20260901+cpu"},
            ["this is a downgrade from torch 2.15.0.dev20260901+cpu to torch 2.14.1+cpu"],
        ),
        (
            {"torch": "2.14.1+cu130", "torchvision": "0.29.2", "torchaudio": "2.11.1"},
            ["this is a downgrade from torchvision 0.29.2 to torchvision 0.29.1+cpu"],
        ),
    ],
)
def test_downgrades_of_the_cpu_plan(installed, expected):
    assert install_torch.downgrades(plan(cpu=True), installed) == expected


def test_an_old_driver_plan_is_a_downgrade_from_a_newer_torch():
    old_driver = plan(cuda="12.4")
    assert install_torch.downgrades(old_driver, {"torch": "2.13.0+cpu", "torchvision": "0.28.0+cpu"}) == [
        "this is a downgrade from torch 2.13.0+cpu to torch 2.6.0+cu124",
        "this is a downgrade from torchvision 0.28.0+cpu to torchvision 0.21.0+cu124",
    ]


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=os.environ | env
    )


def stand_in_python(tmp_path: Path) -> tuple[Path, Path]:
    """An interpreter that records its arguments and runs nothing but the script's query of installed versions."""
    recorder = tmp_path / "python"
    log = tmp_path / "calls.txt"
    query = f'case "$2" in "import importlib.metadata"*) exec {sys.executable} "$@";; esac'
    recorder.write_text(f'#!/bin/sh\necho "$@" >> {log}\n{query}\n')
    recorder.chmod(recorder.stat().st_mode | stat.S_IEXEC)
    return recorder, log


def pip_calls(log: Path) -> list[str]:
    return [call for call in log.read_text().splitlines() if call.startswith("-m pip")] if log.exists() else []


def test_script_prints_without_running():
    result = run_script("--cuda", "12.8")
    assert result.returncode == 0
    assert "torch 2.14.1 + torchvision 0.29.1 + torchaudio 2.11.1, CUDA 12.6 wheels" in result.stdout
    assert (
        "-m pip install torch==2.14.1+cu126 torchvision==0.29.1+cu126 torchaudio==2.11.1 "
        "--index-url https://download.pytorch.org/whl/cu126" in result.stdout
    )
    assert "not run; add --yes" in result.stdout


def test_script_without_nvidia_smi_proposes_cpu_wheels(tmp_path):
    result = run_script(PATH=str(tmp_path))  # a PATH without nvidia-smi
    assert result.returncode == 0, result.stderr
    assert "no NVIDIA driver found" in result.stdout
    assert "CPU-only wheels" in result.stdout
    assert "torch==2.14.1+cpu" in result.stdout and "--index-url https://download.pytorch.org/whl/cpu" in result.stdout


def test_script_says_downgrade_and_runs_it_only_when_allowed(tmp_path):
    installed = importlib.metadata.version("torch")  # this interpreter's torch, read by the script as well
    if install_torch.version_key(installed) <= (2, 5, 1):
        pytest.skip(f"torch {installed} is not newer than the oldest known line")
    python, log = stand_in_python(tmp_path)
    args = ("--cpu", "--torch", "2.5", "--python", str(python))
    printed = run_script(*args)
    assert printed.returncode == 0
    assert f"warning: this is a downgrade from torch {installed} to torch 2.5.1+cpu" in printed.stdout
    assert "--allow-downgrade" in printed.stdout
    refused = run_script(*args, "--yes")
    assert refused.returncode == 2
    assert "this is a downgrade from torch" in refused.stdout
    assert "add --allow-downgrade" in refused.stderr
    assert pip_calls(log) == []
    allowed = run_script(*args, "--yes", "--allow-downgrade")
    assert allowed.returncode == 0
    assert pip_calls(log) == [
        "-m pip install torch==2.5.1+cpu torchvision==0.20.1+cpu torchaudio==2.5.1+cpu "
        "--index-url https://download.pytorch.org/whl/cpu"
    ]


def test_script_refuses_with_exit_code_2():
    result = run_script("--cuda", "12.1", "--torch", "2.9")
    assert result.returncode == 2 and "error: torch 2.9 has builds" in result.stderr
    assert run_script("--cuda", "twelve").returncode == 2
    both = run_script("--cpu", "--cuda", "12.1")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_yes_runs_exactly_the_printed_command(tmp_path):
    # A stand-in interpreter that records its arguments instead of installing anything; it has no packages.
    recorder = tmp_path / "python"
    log = tmp_path / "calls.txt"
    recorder.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    recorder.chmod(recorder.stat().st_mode | stat.S_IEXEC)
    result = run_script("--cpu", "--torch", "2.6", "--python", str(recorder), "--yes")
    assert result.returncode == 0
    calls = log.read_text().splitlines()
    assert calls[0].startswith("-c import importlib.metadata")  # the installed versions, for the downgrade check
    assert pip_calls(log) == [
        "-m pip install torch==2.6.0+cpu torchvision==0.21.0+cpu torchaudio==2.6.0+cpu "
        "--index-url https://download.pytorch.org/whl/cpu"
    ]
    assert calls[-1].startswith("-c import torch")


def test_windows_wrapper_forwards_every_flag():
    """scripts/install_gpu_torch.ps1 has a parameter for each flag of install_torch.py and forwards it."""
    wrapper = (SCRIPT.parent / "install_gpu_torch.ps1").read_text()
    flags = [a.option_strings[0] for a in install_torch.build_parser()._actions if a.option_strings[0] != "-h"]
    for flag in flags:
        parameter = "".join(word.capitalize() for word in flag.removeprefix("--").split("-"))  # --allow-downgrade
        assert f"${parameter}" in wrapper, f"install_gpu_torch.ps1 lacks -{parameter} for {flag}"
        assert re.search(rf"[\s\"]{flag}[\s\"]", wrapper), f"install_gpu_torch.ps1 does not forward {flag}"
