"""The ROCm platform: detection through ``torch.version.hip`` and ``torch.cuda`` (gfx arch, memory). KV profiling
and decode graphs (hipGraphs behind ``torch.cuda.CUDAGraph``) come from the shared ``TorchCudaPlatform``."""

from __future__ import annotations

import os
from typing import Any

import torch
from llmctl.plugins.types import DeviceInfo, DoctorCheck, DoctorResult, ProbeResult
from llmctl_gpu.platform import TorchCudaPlatform

# gfx families with native bf16 matrix instructions (MI200/MI300/MI350, RDNA3/RDNA4).
BF16_ARCH_PREFIXES = ("gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")


def torch_build_problem() -> str | None:
    """Why this torch build cannot drive AMD GPUs, or ``None`` when it is a ROCm build."""
    if getattr(torch.version, "hip", None):
        return None
    if torch.version.cuda is not None:
        return (f"this torch build targets NVIDIA CUDA {torch.version.cuda} (torch {torch.__version__}), not "
                f"ROCm; install a ROCm build of torch for AMD GPUs")
    return f"this torch build is CPU-only (torch {torch.__version__}); install a ROCm build of torch"


def gfx_arch(device_index: int) -> str:
    """``gfx942``-style architecture name (the part of gcnArchName before feature flags like ``:sramecc+``)."""
    props = torch.cuda.get_device_properties(device_index)
    return str(getattr(props, "gcnArchName", "") or "").split(":")[0]


class RocmPlatform(TorchCudaPlatform):
    name = "rocm"
    vendor = "ROCm"

    def _probe(self) -> ProbeResult:
        problem = torch_build_problem()
        if problem:
            return ProbeResult(False, problem, details={"torch": torch.__version__})
        details: dict[str, Any] = {"torch": torch.__version__, "hip_version": torch.version.hip}
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            visible = os.environ.get("HIP_VISIBLE_DEVICES", os.environ.get("ROCR_VISIBLE_DEVICES"))
            hint = f" (HIP_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            return ProbeResult(False, f"no AMD GPU is visible to torch {torch.__version__} (HIP "
                                      f"{torch.version.hip}){hint}; check rocm-smi and that the user is in the "
                                      f"render/video groups", details=details)
        devices = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            try:
                free, _ = torch.cuda.mem_get_info(i)
            except Exception:
                free = None
            devices.append(DeviceInfo(
                index=i, name=props.name, total_memory=int(props.total_memory),
                free_memory=None if free is None else int(free),
                capabilities={"gfx_arch": gfx_arch(i), "compute_units": props.multi_processor_count}))
        return ProbeResult(True, "", tuple(devices), details)

    def has_bf16(self) -> bool:
        return gfx_arch(0).startswith(BF16_ARCH_PREFIXES)


def _rocm_versions() -> DoctorResult:
    try:
        problem = torch_build_problem()
        if problem:
            return DoctorResult(False, problem, "pip install torch --index-url https://download.pytorch.org/whl/rocm6.2")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        archs = sorted({gfx_arch(i) for i in range(gpus)})
        msg = f"torch {torch.__version__} built for HIP {torch.version.hip}; {gpus} GPU(s) {', '.join(archs)}"
        if gpus == 0:
            return DoctorResult(False, msg, "no GPU visible: check rocm-smi and HIP_VISIBLE_DEVICES")
        return DoctorResult(True, msg)
    except Exception as exc:
        return DoctorResult(False, f"ROCm check failed: {type(exc).__name__}: {exc}")


def doctor_checks() -> list[DoctorCheck]:
    return [DoctorCheck("rocm: HIP version and GPU architectures", _rocm_versions)]
