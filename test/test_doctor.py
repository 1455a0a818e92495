import importlib.metadata

import pytest
import torch

from transcriptformer.cli import main
from transcriptformer.config import ModelConfig
from transcriptformer.doctor import (
    BF16_PAYS,
    INSTALL_TORCH,
    PUBLISHED_MODELS,
    CudaDevice,
    Environment,
    GpuInfo,
    build_cuda,
    bytes_per_cell,
    check_flex_attention,
    cpu_bf16_finding,
    cpu_flags,
    diagnose,
    driver_cuda_version,
    format_findings,
    gather_environment,
    memory_findings,
    parse_gpu_table,
    run_doctor,
    split_version,
    suggested_batch_size,
    torch_build,
    trio_problems,
    weight_bytes,
)

HEADER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
+-----------------------------------------------------------------------------------------+
"""
GPU_CSV = "0, NVIDIA A100-SXM4-80GB, 550.54.15, 81920, 81037\n1, NVIDIA A100-SXM4-80GB, 550.54.15, 81920, 1200\n"
A100 = GpuInfo(0, "NVIDIA A100-SXM4-80GB", "550.54.15", 81920, 81037)
SAPIENS, EXEMPLAR, METAZOA = PUBLISHED_MODELS
GIB = 1 << 30


def environment(**changes) -> Environment:
    facts = {
        "python": "3.11.7",
        "system": "Linux x86_64",
        "versions": {"torch": "2.5.1+cu121", "torchvision": "0.20.1+cu121", "torchaudio": None},
        "torch_cuda": "12.1",
        "cuda_available": True,
        "mps_available": False,
        "driver_cuda": "12.4",
        "gpus": [A100],
        "cuda_devices": [CudaDevice("NVIDIA A100-SXM4-80GB", 80 * GIB, 80 * GIB)],
    }
    return Environment(**(facts | changes))


def problems(env: Environment) -> list:
    return [f for f in diagnose(env) if f.level == "problem"]


def test_nvidia_smi_parsing():
    assert driver_cuda_version(HEADER) == "12.4"
    assert driver_cuda_version("NVIDIA-SMI has failed because it couldn't communicate with the driver") is None
    assert parse_gpu_table(GPU_CSV) == [A100, GpuInfo(1, "NVIDIA A100-SXM4-80GB", "550.54.15", 81920, 1200)]
    assert parse_gpu_table("") == []


def test_working_gpu_setup_has_no_problem():
    findings = diagnose(environment())
    assert not [f for f in findings if f.level == "problem"]
    assert "uses the GPU: NVIDIA A100-SXM4-80GB" in format_findings(findings)


def test_cpu_only_torch_on_a_gpu_machine_is_a_problem_with_a_fix():
    env = environment(
        versions={"torch": "2.5.1+cpu", "torchvision": "0.20.1+cpu", "torchaudio": "2.5.1+cpu"},
        torch_cuda=None,
        cuda_available=False,
        cuda_devices=[],
    )
    (problem,) = problems(env)
    assert "torch 2.5.1+cpu is a CPU-only build, but this machine has an NVIDIA GPU (NVIDIA A100" in problem.message
    assert problem.fix == INSTALL_TORCH == "python scripts/install_torch.py --yes"
    assert "-> fix: python scripts/install_torch.py --yes" in format_findings([problem])


def test_torch_built_for_a_newer_cuda_than_the_driver():
    env = environment(torch_cuda="12.8", cuda_available=False, cuda_devices=[], driver_cuda="12.4",
                      versions={"torch": "2.9.1+cu128"})  # fmt: skip
    (problem,) = problems(env)
    assert "built for CUDA 12.8 but the driver supports only CUDA 12.4" in problem.message
    assert "update the NVIDIA driver" in problem.fix
    hidden = environment(cuda_available=False, cuda_devices=[])
    assert "CUDA_VISIBLE_DEVICES" in problems(hidden)[0].fix


def test_old_python_is_a_problem():
    (problem,) = problems(environment(python="3.10.12"))
    assert problem.message.startswith("Python 3.10.12")
    assert problems(environment(python="3.14.0rc1")) == []


@pytest.mark.parametrize(
    ("version", "torch_cuda", "release", "build", "cuda"),
    [
        ("2.14.1+cu130", "13.0", (2, 14, 1), "cu130", "13.0"),
        ("2.14.1+cu130", None, (2, 14, 1), "cu130", "13.0"),  # the label alone names the CUDA build
        ("2.13.0+cpu", None, (2, 13, 0), "cpu", None),
        ("2.14.1", "13.0", (2, 14, 1), "cu130", "13.0"),  # PyPI's Linux wheel: no label in its metadata, CUDA 13.0
        ("2.14.1", None, (2, 14, 1), None, None),  # PyPI's macOS wheel
        ("2.8.0+cu129", "12.9", (2, 8, 0), "cu129", "12.9"),
        ("2.6.0+rocm6.2", None, (2, 6, 0), "rocm6.2", None),
        ("2.15.0.dev20260901+cpu", None, (2, 15, 0), "cpu", None),
        ("2.14.0a0+gitc0ffee1", "13.0", (2, 14, 0), "cu130", "13.0"),  # a source build: its label names a commit
        ("2.14.0a0+gitc0ffee1", None, (2, 14, 0), None, None),
    ],
)
def test_versions_and_builds(version, torch_cuda, release, build, cuda):
    assert split_version(version)[0] == release
    assert torch_build(version, torch_cuda) == build
    assert build_cuda(version, torch_cuda) == cuda


def test_cuda_build_with_and_without_a_label_uses_the_gpu():
    # pip install torch on Linux: torch.__version__ is 2.14.1+cu130, the metadata of every package has no label.
    for torch_version in ("2.14.1+cu130", "2.14.1"):
        env = environment(
            versions={"torch": torch_version, "torchvision": "0.29.1", "torchaudio": "2.11.1"},
            torch_cuda="13.0",
            driver_cuda="13.0",
        )
        text = format_findings(diagnose(env))
        assert problems(env) == [], text
        assert f"torch {torch_version} (CUDA 13.0) uses the GPU: NVIDIA A100" in text
        assert f"consistent packages: torch {torch_version}, torchvision 0.29.1, torchaudio 2.11.1" in text


def test_unlabelled_cuda_build_against_an_old_driver_and_a_cpu_torchvision():
    env = environment(
        versions={"torch": "2.14.1", "torchvision": "0.29.1+cpu", "torchaudio": None},
        torch_cuda="13.0",
        cuda_available=False,
        cuda_devices=[],
        driver_cuda="12.4",
    )
    build, trio = problems(env)
    assert "torch 2.14.1 cannot use the GPU" in build.message
    assert "built for CUDA 13.0 but the driver supports only CUDA 12.4" in build.message
    assert trio.message == "torchvision 0.29.1+cpu is a cpu build but torch 2.14.1 a cu130 build"


def test_cpu_build_2_13():
    cpu_versions = {"torch": "2.13.0+cpu", "torchvision": "0.28.0+cpu", "torchaudio": "2.11.1"}
    on_gpu_machine = environment(versions=cpu_versions, torch_cuda=None, cuda_available=False, cuda_devices=[])
    (problem,) = problems(on_gpu_machine)
    assert problem.message.startswith("torch 2.13.0+cpu is a CPU-only build, but this machine has an NVIDIA GPU")
    laptop = environment(versions=cpu_versions, torch_cuda=None, cuda_available=False, gpus=[], cuda_devices=[])
    text = format_findings(diagnose(laptop))
    assert problems(laptop) == []
    assert "torch 2.13.0+cpu (CPU-only build); no GPU found" in text
    assert "consistent packages: torch 2.13.0+cpu, torchvision 0.28.0+cpu, torchaudio 2.11.1" in text


def test_rocm_build_is_named():
    rocm = {"torch": "2.6.0+rocm6.2", "torchvision": "0.21.0+rocm6.2", "torchaudio": None}
    (problem,) = problems(environment(versions=rocm, torch_cuda=None, cuda_available=False, cuda_devices=[]))
    assert problem.message.startswith("torch 2.6.0+rocm6.2 is a ROCm 6.2 build, but this machine has an NVIDIA GPU")
    amd = environment(versions=rocm, torch_cuda=None, gpus=[], cuda_devices=[CudaDevice("AMD Instinct MI300X", 1, 1)])
    assert "torch 2.6.0+rocm6.2 (ROCm 6.2) uses the GPU: AMD Instinct MI300X" in format_findings(diagnose(amd))


def test_machine_without_gpu_is_fine():
    env = environment(versions={"torch": "2.5.1+cpu"}, torch_cuda=None, cuda_available=False, gpus=[], cuda_devices=[])
    assert problems(env) == []
    assert "no GPU found" in format_findings(diagnose(env))


def test_torch_package_trio_consistency():
    assert trio_problems({"torch": "2.5.1+cu121", "torchvision": "0.20.1+cu121", "torchaudio": "2.5.1+cu121"}) == []
    assert trio_problems({"torch": "2.9.1", "torchvision": "0.24.1", "torchaudio": "2.9.1"}) == []
    assert trio_problems({"torch": "2.6.0", "torchvision": None, "torchaudio": None}) == []
    assert trio_problems({"torch": "2.5.1", "torchvision": "0.19.1", "torchaudio": "2.4.1"}) == [
        "torchvision 0.19.1 does not belong to torch 2.5.1 (expected torchvision 0.20.x)",
        "torchaudio 2.4.1 does not belong to torch 2.5.1 (expected torchaudio 2.5.x)",
    ]
    assert trio_problems({"torch": "2.5.1+cu121", "torchvision": "0.20.1+cpu"}) == [
        "torchvision 0.20.1+cpu is a cpu build but torch 2.5.1+cu121 a cu121 build"
    ]
    mismatched = environment(versions={"torch": "2.5.1+cu121", "torchvision": "0.21.0+cu124", "torchaudio": None})
    assert [p.fix for p in problems(mismatched)] == [INSTALL_TORCH]


def test_trio_with_local_labels():
    assert trio_problems({"torch": "2.14.1+cu130", "torchvision": "0.29.1+cu130", "torchaudio": "2.11.1"}) == []
    assert trio_problems({"torch": "2.14.1+cu130", "torchvision": "0.29.1", "torchaudio": "2.11.1"}) == []
    assert trio_problems({"torch": "2.13.0+cpu", "torchvision": "0.28.0+cpu", "torchaudio": "2.11.1+cpu"}) == []
    assert trio_problems({"torch": "2.14.1", "torchvision": "0.29.1+cu130"}, torch_cuda="13.0") == []
    assert trio_problems({"torch": "2.14.1", "torchvision": "0.29.1+cu126"}, torch_cuda="13.0") == [
        "torchvision 0.29.1+cu126 is a cu126 build but torch 2.14.1 a cu130 build"
    ]
    assert trio_problems({"torch": "2.14.1", "torchvision": "0.29.1+cu126"}) == []  # torch's build unknown
    assert trio_problems({"torch": "2.6.0+rocm6.2", "torchvision": "0.21.0+cpu"}) == [
        "torchvision 0.21.0+cpu is a cpu build but torch 2.6.0+rocm6.2 a rocm6.2 build"
    ]
    # A source build's label names a commit, not a build: it agrees with any.
    assert trio_problems({"torch": "2.14.0a0+gitc0ffee1", "torchvision": "0.29.1+cu130"}) == []


def test_torchaudio_2_11_1_serves_every_later_torch():
    assert trio_problems({"torch": "2.11.0", "torchaudio": "2.11.0"}) == []
    assert trio_problems({"torch": "2.11.0+cu128", "torchaudio": "2.11.1"}) == []
    assert trio_problems({"torch": "2.12.1+cu130", "torchaudio": "2.11.1"}) == []
    assert trio_problems({"torch": "2.14.1+cu130", "torchaudio": "2.11.0"}) == [
        "torchaudio 2.11.0 does not belong to torch 2.14.1+cu130 (expected torchaudio 2.11.1 to 2.14.x)"
    ]
    assert trio_problems({"torch": "2.10.0", "torchaudio": "2.11.1"}) == [
        "torchaudio 2.11.1 does not belong to torch 2.10.0 (expected torchaudio 2.10.x)"
    ]
    assert trio_problems({"torch": "2.14.1", "torchvision": "0.28.0"}) == [
        "torchvision 0.28.0 does not belong to torch 2.14.1 (expected torchvision 0.29.x)"
    ]


def test_weights_of_published_models_follow_the_vocabulary():
    sizes = [weight_bytes(m) for m in PUBLISHED_MODELS]
    assert sizes == sorted(sizes)
    # Per vocabulary entry: an ESM row, a gene-id head column and bias, and a count-head bias; 4 bytes each.
    per_gene = (SAPIENS.esm_width + ModelConfig().gene_head_hidden_dim + 1 + 1) * 4
    assert sizes[2] - sizes[0] == (METAZOA.vocab_size - SAPIENS.vocab_size) * per_gene
    assert 1.5 * GIB < sizes[0] < 2 * GIB


def test_batch_size_suggestions():
    assert bytes_per_cell(METAZOA, gene_llh=True) > bytes_per_cell(SAPIENS, gene_llh=True)
    assert bytes_per_cell(METAZOA, gene_llh=False) == bytes_per_cell(SAPIENS, gene_llh=False)
    small, large = (suggested_batch_size(free * GIB, SAPIENS, gene_llh=False) for free in (12, 80))
    assert 0 < small < large
    assert suggested_batch_size(80 * GIB, SAPIENS, True) < large
    assert suggested_batch_size(1 * GIB, SAPIENS, False) == 0
    text = format_findings(memory_findings([CudaDevice("Small GPU", 4 * GIB, 8 * GIB)]))
    assert "cuda:0 Small GPU: 4.0 of 8.0 GiB free" in text
    assert "tf-metazoa: does not fit" in text and "tf-sapiens: batch size" in text


def test_doctor_on_this_machine(capsys):
    env = gather_environment()
    # The running torch, with its build label (2.14.1+cu130) even where the package metadata has none (2.14.1).
    assert env.versions["torch"] == torch.__version__
    assert split_version(env.versions["torch"])[0] == split_version(importlib.metadata.version("torch"))[0]
    build = torch_build(env.versions["torch"], env.torch_cuda)
    assert (build or "").startswith("cu") == (torch.version.cuda is not None)
    assert build_cuda(env.versions["torch"], env.torch_cuda) == torch.version.cuda
    assert env.cuda_available == torch.cuda.is_available()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flex = check_flex_attention(device)
    assert flex.level != "problem", flex.message
    findings, code = run_doctor(check_flex=False)
    assert code == int(any(f.level == "problem" for f in findings))
    assert main(["doctor", "--skip-flex"]) == code
    out = capsys.readouterr().out
    assert f"Python {env.python}" in out and f"torch {torch.__version__}" in out


def test_cpu_bf16_matrix_instructions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu sse2 avx512f avx512_bf16\n"
    )
    flags = cpu_flags(str(cpuinfo))
    assert {"avx512f", "avx512_bf16"} <= flags and "model" not in flags
    assert cpu_flags(str(tmp_path / "absent")) is None
    avx = cpu_bf16_finding(flags)
    assert avx.message == f"CPU bf16 matrix instructions: AVX512-BF16 ({BF16_PAYS})"
    assert "compiled once per machine" in avx.message and "faster than 32" in avx.message
    assert "AMX-BF16, AVX512-BF16" in cpu_bf16_finding(flags | {"amx_bf16"}).message
    assert "use precision 32" in cpu_bf16_finding(frozenset({"avx2"})).message
    assert "unknown" in cpu_bf16_finding(None).message
    assert all(f.level == "info" for f in (avx, cpu_bf16_finding(None)))


def test_doctor_names_this_cpus_bf16_instructions(capsys):
    assert main(["doctor", "--skip-flex"]) in (0, 1)
    line = next(line for line in capsys.readouterr().out.splitlines() if "CPU bf16 matrix instructions" in line)
    flags = cpu_flags()
    if flags is not None and "avx512_bf16" in flags:
        assert "AVX512-BF16" in line
    elif flags is not None and "amx_bf16" not in flags:
        assert "none" in line
