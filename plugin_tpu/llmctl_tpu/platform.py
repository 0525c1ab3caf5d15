"""TPU detection through torch_xla's PJRT runtime; every failure becomes a reason, never an exception."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from llmctl.plugins.types import DeviceInfo, DoctorResult, Platform, ProbeResult


def torch_xla_missing() -> str:
    """Why torch_xla cannot be used, or "" when it is importable (checked without importing it)."""
    try:
        if importlib.util.find_spec("torch_xla") is None:
            return "torch_xla is not installed (pip install 'llmctl-tpu[xla]' on a TPU VM)"
    except Exception as exc:
        return f"torch_xla lookup failed: {type(exc).__name__}: {exc}"
    return ""


def _memory(xm: Any, device: Any) -> tuple[int | None, int | None]:
    """(free, total) bytes of HBM. torch_xla has reported this as kb_free/kb_total and, in newer releases, as
    bytes_used/bytes_limit; accept either."""
    info = xm.get_memory_info(device)
    if "bytes_limit" in info:
        total = int(info["bytes_limit"])
        return total - int(info.get("bytes_used", 0)), total
    if "kb_total" in info:
        return int(info["kb_free"]) * 1024, int(info["kb_total"]) * 1024
    return None, None


class TpuPlatform(Platform):
    name = "tpu"
    device_type = "xla"
    priority = 90

    def probe(self) -> ProbeResult:
        missing = torch_xla_missing()
        if missing:
            return ProbeResult(False, missing)
        try:
            import torch_xla.core.xla_model as xm
            import torch_xla.runtime as xr

            if xr.device_type() != "TPU":
                return ProbeResult(False, f"torch_xla's PJRT device is {xr.device_type()!r}, not TPU "
                                          f"(set PJRT_DEVICE=TPU on a TPU VM)")
            devices = []
            for i, dev in enumerate(xm.get_xla_supported_devices()):
                free, total = _memory(xm, torch.device(dev))
                devices.append(DeviceInfo(index=i, name=str(dev), total_memory=total, free_memory=free))
            chip = None
            try:
                from torch_xla._internal import tpu

                chip = tpu.version()
            except Exception:
                pass
            return ProbeResult(True, devices=tuple(devices), details={
                "chip": f"TPU v{chip}" if chip else "unknown", "global_devices": xr.global_runtime_device_count(),
                "torch_xla": getattr(importlib.import_module("torch_xla"), "__version__", "?")})
        except Exception as exc:
            return ProbeResult(False, f"TPU detection through torch_xla failed: {type(exc).__name__}: {exc}")

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        import torch_xla.core.xla_model as xm

        free, total = _memory(xm, self.torch_device(device_index))
        if free is None or total is None:
            raise RuntimeError("torch_xla did not report HBM usage for this device")
        return free, total

    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float32]

    def configure(self, config: Any) -> dict[str, Any]:
        # The ragged paged attention kernel is tuned for large pages; smaller ones waste its DMA slots.
        if getattr(config, "block_size", 16) < 16:
            return {"block_size": 16}
        return {}


def doctor_check() -> DoctorResult:
    probe = TpuPlatform().probe()
    if not probe.available:
        return DoctorResult(False, probe.reason, hint="run on a Cloud TPU VM with torch_xla installed")
    return DoctorResult(True, f"{len(probe.devices)} TPU device(s), chip {probe.details.get('chip')}, "
                              f"torch_xla {probe.details.get('torch_xla')}")
