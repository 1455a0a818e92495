<#
.SYNOPSIS
    Install a consistent torch / torchvision / torchaudio trio with CUDA wheels on Windows.

.DESCRIPTION
    Thin wrapper around scripts\install_torch.py (which holds the release table and every check): it shows the
    plan and the pip command for this machine's NVIDIA driver, asks before running it, then prints the installed
    torch version and whether it sees the GPU.

.EXAMPLE
    powershell -ExecutionPolicy Bypass -File scripts\install_gpu_torch.ps1
.EXAMPLE
    powershell -ExecutionPolicy Bypass -File scripts\install_gpu_torch.ps1 -Cuda 12.1 -Yes
.EXAMPLE
    powershell -ExecutionPolicy Bypass -File scripts\install_gpu_torch.ps1 -Torch 2.6 -Python .venv\Scripts\python.exe
#>
param(
    # CUDA version the driver supports (the "CUDA Version" of nvidia-smi); read from nvidia-smi when omitted.
    [string]$Cuda = "",
    # Release line such as 2.6; the newest that fits when omitted.
    [string]$Torch = "",
    # CPU-only wheels instead.
    [switch]$Cpu,
    # Interpreter (of the virtual environment) to install into.
    [string]$Python = "python",
    # Run without asking.
    [switch]$Yes,
    # Also run a plan that lowers an installed torch, torchvision or torchaudio (install_torch.py refuses otherwise).
    [switch]$AllowDowngrade
)

$ErrorActionPreference = "Stop"
$planner = Join-Path $PSScriptRoot "install_torch.py"
$forward = @($planner, "--python", $Python)
if ($Cuda) { $forward += @("--cuda", $Cuda) }
if ($Torch) { $forward += @("--torch", $Torch) }
if ($Cpu) { $forward += "--cpu" }
if ($AllowDowngrade) { $forward += "--allow-downgrade" }

& $Python @forward
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }

if (-not $Yes) {
    $answer = Read-Host "Run this command now? [y/N]"
    if ($answer -notmatch "^[yY]") { exit 0 }
}
& $Python @forward --yes
exit $LASTEXITCODE
