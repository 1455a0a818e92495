import importlib.util
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
        assert release.torchaudio == release.torch
        assert release.torchvision.startswith(f"0.{minor + 15}.")  # torchvision 0.(minor+15) pairs with torch 2.minor
        assert list(release.cuda) == sorted(release.cuda, key=install_torch.version_key)
    lines = [install_torch.version_key(r.torch) for r in install_torch.RELEASES]
    assert lines == sorted(lines, reverse=True)


@pytest.mark.parametrize(
    ("driver", "torch", "variant"),
    [
        ("13.0", "2.9.1", "cu130"),
        ("12.9", "2.9.1", "cu128"),
        ("12.8", "2.9.1", "cu128"),
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
    assert chosen.requirements() == [
        f"torch=={r.torch}+{variant}",
        f"torchvision=={r.torchvision}+{variant}",
        f"torchaudio=={r.torchaudio}+{variant}",
    ]
    assert chosen.command("python")[-2:] == ["--index-url", f"https://download.pytorch.org/whl/{variant}"]


def test_requested_release_line():
    assert plan(cuda="12.1", torch="2.5").variant == "cu121"
    assert plan(cuda="12.9", torch="2.6.0").variant == "cu126"
    assert plan(cpu=True, torch="2.7").requirements()[0] == "torch==2.7.1+cpu"


def test_cpu_and_macos_wheels():
    cpu = plan(cpu=True)
    assert cpu.command("py") == [
        "py", "-m", "pip", "install", "torch==2.9.1+cpu", "torchvision==0.24.1+cpu", "torchaudio==2.9.1+cpu",
        "--index-url", "https://download.pytorch.org/whl/cpu",
    ]  # fmt: skip
    mac = plan(system="Darwin")
    assert mac.command("py") == [
        "py",
        "-m",
        "pip",
        "install",
        "torch==2.9.1",
        "torchvision==0.24.1",
        "torchaudio==2.9.1",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"cuda": "12.1", "torch": "2.9"},
            r"torch 2.9 has builds for CUDA 12.6, 12.8, 13.0; none runs .* CUDA 12.1 \(torch 2.7, 2.6, 2.5 would\)",
        ),
        ({"cuda": "11.2"}, "older than every build"),
        ({"cuda": "12.4", "torch": "2.4"}, r"torch 2.4 is not a release line this script knows \(known: 2.9, "),
        ({"cuda": "12.4", "system": "Darwin"}, "no CUDA builds for macOS"),
        ({"cuda": "12.4", "cpu": True}, "contradict"),
        ({}, "no NVIDIA driver found"),
    ],
)
def test_inconsistent_requests_are_refused(kwargs, message):
    with pytest.raises(install_torch.InconsistentRequest, match=message):
        plan(**kwargs)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_script_prints_without_running():
    result = run_script("--cuda", "12.8")
    assert result.returncode == 0
    assert "torch 2.9.1 + torchvision 0.24.1 + torchaudio 2.9.1, CUDA 12.8 wheels" in result.stdout
    assert (
        "-m pip install torch==2.9.1+cu128 torchvision==0.24.1+cu128 torchaudio==2.9.1+cu128 "
        "--index-url https://download.pytorch.org/whl/cu128" in result.stdout
    )
    assert "not run; add --yes" in result.stdout


def test_script_refuses_with_exit_code_2():
    result = run_script("--cuda", "12.1", "--torch", "2.9")
    assert result.returncode == 2 and "error: torch 2.9 has builds" in result.stderr
    assert run_script("--cuda", "twelve").returncode == 2
    both = run_script("--cpu", "--cuda", "12.1")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_yes_runs_exactly_the_printed_command(tmp_path):
    # A stand-in interpreter that records its arguments instead of installing anything.
    recorder = tmp_path / "python"
    log = tmp_path / "calls.txt"
    recorder.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    recorder.chmod(recorder.stat().st_mode | stat.S_IEXEC)
    result = run_script("--cpu", "--torch", "2.6", "--python", str(recorder), "--yes")
    assert result.returncode == 0
    calls = log.read_text().splitlines()
    assert calls[0] == (
        "-m pip install torch==2.6.0+cpu torchvision==0.21.0+cpu torchaudio==2.6.0+cpu "
        "--index-url https://download.pytorch.org/whl/cpu"
    )
    assert calls[1].startswith("-c import torch")
