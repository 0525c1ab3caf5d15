"""``llmctl doctor`` lines for CUDA hosts: driver and toolkit versions, and the optional attention libraries."""

from __future__ import annotations

import torch
from llmctl.plugins.types import DoctorCheck, DoctorResult

from llmctl_cuda.flash import package_installed
from llmctl_cuda.platform import driver_version_from_proc, nvml_info, torch_build_problem


def _cuda_versions() -> DoctorResult:
    try:
        problem = torch_build_problem()
        if problem:
            return DoctorResult(False, problem, "pip install torch --index-url https://download.pytorch.org/whl/cu124")
        driver = nvml_info().get("driver_version") or driver_version_from_proc()
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        msg = (f"torch {torch.__version__} built for CUDA {torch.version.cuda}; driver {driver or 'unknown'}; "
               f"{gpus} GPU(s)")
        if gpus == 0:
            return DoctorResult(False, msg, "no GPU visible: check nvidia-smi, the driver and CUDA_VISIBLE_DEVICES")
        return DoctorResult(True, msg)
    except Exception as exc:
        return DoctorResult(False, f"CUDA check failed: {type(exc).__name__}: {exc}")


def _optional(package: str, pip_name: str, purpose: str) -> DoctorResult:
    try:
        if package_installed(package):
            from importlib.metadata import version

            try:
                ver = version(pip_name)
            except Exception:
                ver = "unknown version"
            return DoctorResult(True, f"{package} {ver} installed ({purpose})")
        return DoctorResult(True, f"{package} not installed; the Triton backend is used instead",
                            f"optional: pip install {pip_name}")
    except Exception as exc:
        return DoctorResult(False, f"{package} check failed: {type(exc).__name__}: {exc}")


def doctor_checks() -> list[DoctorCheck]:
    return [
        DoctorCheck("cuda: driver and CUDA versions", _cuda_versions),
        DoctorCheck("cuda: flash_attn", lambda: _optional("flash_attn", "flash-attn", "attention, block_size % 256")),
        DoctorCheck("cuda: flashinfer", lambda: _optional("flashinfer", "flashinfer-python", "paged attention")),
    ]
