import torch

from transcriptformer.cli import main
from transcriptformer.config import ModelConfig
from transcriptformer.doctor import (
    INSTALL_TORCH,
    PUBLISHED_MODELS,
    CudaDevice,
    Environment,
    GpuInfo,
    bytes_per_cell,
    check_flex_attention,
    diagnose,
    driver_cuda_version,
    format_findings,
    gather_environment,
    memory_findings,
    parse_gpu_table,
    run_doctor,
    suggested_batch_size,
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
    assert env.versions["torch"] == torch.__version__
    assert env.cuda_available == torch.cuda.is_available()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flex = check_flex_attention(device)
    assert flex.level != "problem", flex.message
    findings, code = run_doctor(check_flex=False)
    assert code == int(any(f.level == "problem" for f in findings))
    assert main(["doctor", "--skip-flex"]) == code
    out = capsys.readouterr().out
    assert f"Python {env.python}" in out and f"torch {torch.__version__}" in out
