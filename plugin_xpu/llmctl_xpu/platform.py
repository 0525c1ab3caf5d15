"""Detection of Intel GPUs through ``torch.xpu``; every failure becomes a reason, never an exception."""

from __future__ import annotations

from typing import Any

import torch
from llmctl.plugins.types import DeviceInfo, DoctorResult, Platform, ProbeResult


def xpu_dist_backend() -> str:
    """torch >= 2.8 ships the xccl backend for XPU; older stacks use oneCCL's "ccl" from oneccl_bindings."""
    try:
        import torch.distributed as dist

        if "xccl" in getattr(dist.Backend, "backend_list", []):
            return "xccl"
    except Exception:
        pass
    return "ccl"


def _xpu_module() -> tuple[Any | None, str]:
    xpu = getattr(torch, "xpu", None)
    if xpu is None:
        return None, "torch.xpu is not available: this torch build has no XPU support"
    try:
        if not xpu.is_available():
            compiled = getattr(torch._C, "_has_xpu", None)
            if compiled is False:
                return None, ("torch.xpu is not available: this torch build has no XPU support "
                              "(install the XPU wheel: pip install torch --index-url https://download.pytorch.org/whl/xpu)")
            return None, "torch.xpu is not available: no Intel GPU was found (check the driver and `sycl-ls`)"
    except Exception as exc:
        return None, f"torch.xpu.is_available() failed: {type(exc).__name__}: {exc}"
    return xpu, ""


def _device_info(xpu: Any, index: int) -> DeviceInfo:
    props = xpu.get_device_properties(index)
    free = total = getattr(props, "total_memory", None)
    try:
        free, total = xpu.mem_get_info(index)
    except Exception:
        pass  # older torch: only the total is known
    caps = {k: getattr(props, k) for k in ("driver_version", "platform_name", "max_compute_units",
                                           "gpu_eu_count", "has_fp16", "has_fp64", "has_atomic64")
            if hasattr(props, k)}
    return DeviceInfo(index=index, name=str(getattr(props, "name", f"xpu:{index}")), total_memory=total,
                      free_memory=free, capabilities=caps)


class XpuPlatform(Platform):
    name = "xpu"
    device_type = "xpu"
    priority = 90

    def probe(self) -> ProbeResult:
        try:
            xpu, reason = _xpu_module()
            if xpu is None:
                return ProbeResult(False, reason)
            count = xpu.device_count()
            if count == 0:
                return ProbeResult(False, "torch.xpu reports 0 devices")
            devices = tuple(_device_info(xpu, i) for i in range(count))
            driver = devices[0].capabilities.get("driver_version")
            return ProbeResult(True, devices=devices, details={"driver_version": driver, "torch": torch.__version__,
                                                                "dist_backend": xpu_dist_backend()})
        except Exception as exc:
            return ProbeResult(False, f"XPU detection failed: {type(exc).__name__}: {exc}")

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        free, total = torch.xpu.mem_get_info(device_index)
        return int(free), int(total)

    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]


def doctor_check() -> DoctorResult:
    probe = XpuPlatform().probe()
    if not probe.available:
        return DoctorResult(False, probe.reason, hint="llmctl-xpu needs an Intel GPU driver and an XPU torch build")
    try:
        import intel_extension_for_pytorch as ipex  # noqa: F401

        ipex_line = f"IPEX {getattr(ipex, '__version__', '?')}"
    except Exception:
        ipex_line = "IPEX not installed (pip install 'llmctl-xpu[ipex]' for the paged-attention kernels)"
    names = ", ".join(d.name for d in probe.devices)
    return DoctorResult(True, f"{len(probe.devices)} XPU device(s): {names}; driver "
                              f"{probe.details.get('driver_version')}; {ipex_line}")
