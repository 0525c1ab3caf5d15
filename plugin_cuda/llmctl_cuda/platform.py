"""The CUDA platform: detection through torch.cuda (plus NVML when installed); memory, dtypes, KV profiling and
decode graphs come from the shared ``TorchCudaPlatform``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from llmctl.plugins.types import DeviceInfo, ProbeResult
from llmctl_gpu.platform import TorchCudaPlatform


def nvml_info() -> dict[str, Any]:
    """Driver version and per-device free memory from NVML, or ``{}`` when pynvml is missing or fails.

    NVML answers without creating a CUDA context, which costs hundreds of MiB per device."""
    try:
        import pynvml
    except Exception:
        return {}
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return {"nvml_error": f"{type(exc).__name__}: {exc}"}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        info: dict[str, Any] = {"driver_version": driver.decode() if isinstance(driver, bytes) else str(driver)}
        free = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            mem = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
            free.append(int(mem.free))
        info["nvml_free_memory"] = free
        return info
    except Exception as exc:
        return {"nvml_error": f"{type(exc).__name__}: {exc}"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def driver_version_from_proc() -> str | None:
    """The kernel driver's version from ``/proc/driver/nvidia/version`` (Linux), used when NVML is absent."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return None


def torch_build_problem() -> str | None:
    """Why this torch build cannot drive NVIDIA GPUs, or ``None`` when it is a CUDA build."""
    if getattr(torch.version, "hip", None):
        return (f"this torch build targets ROCm (torch {torch.__version__}, HIP {torch.version.hip}), not CUDA; "
                f"AMD GPUs are driven by the llmctl-rocm plugin")
    if torch.version.cuda is None:
        return f"this torch build is CPU-only (torch {torch.__version__}); install a CUDA build of torch"
    return None


class CudaPlatform(TorchCudaPlatform):
    name = "cuda"
    vendor = "CUDA"

    def _probe(self) -> ProbeResult:
        problem = torch_build_problem()
        if problem:
            return ProbeResult(False, problem, details={"torch": torch.__version__})
        details: dict[str, Any] = {"torch": torch.__version__, "cuda_version": torch.version.cuda}
        nvml = nvml_info()
        details.update({k: v for k, v in nvml.items() if k != "nvml_free_memory"})
        details.setdefault("driver_version", driver_version_from_proc())
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            return ProbeResult(False, f"no NVIDIA GPU is visible to torch {torch.__version__} (CUDA "
                                      f"{torch.version.cuda}){hint}; check the driver with nvidia-smi",
                               details=details)
        nvml_free = nvml.get("nvml_free_memory") or []
        devices = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free = nvml_free[i] if i < len(nvml_free) else None
            devices.append(DeviceInfo(
                index=i, name=props.name, total_memory=int(props.total_memory), free_memory=free,
                capabilities={"compute_capability": f"{props.major}.{props.minor}",
                              "multiprocessors": props.multi_processor_count}))
        try:
            details["cudnn_version"] = torch.backends.cudnn.version()
        except Exception:
            details["cudnn_version"] = None
        return ProbeResult(True, "", tuple(devices), details)

    def capability(self, device_index: int = 0) -> tuple[int, int]:
        return torch.cuda.get_device_capability(device_index)

    def has_bf16(self) -> bool:
        return self.capability() >= (8, 0)
