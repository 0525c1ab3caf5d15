"""The ``example-cpu`` platform: what core asks a piece of hardware before running on it."""

from __future__ import annotations

import os

import torch
from llmctl.plugins.types import DeviceInfo, Platform, ProbeResult


def _meminfo() -> tuple[int, int] | None:
    """(available, total) bytes from /proc/meminfo; None where there is no such file (macOS, Windows)."""
    try:
        fields = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
        return fields["MemAvailable"], fields["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return None


class ExampleCpuPlatform(Platform):
    name = "example-cpu"  # VENDOR: your platform name
    device_type = "cpu"  # VENDOR: the torch device type your runtime registers ("xpu", "hpu", "privateuseone", ...)
    priority = -10  # VENDOR: > 0 for an accelerator, so it wins over the CPU (0) when present
    dist_backend = "gloo"  # VENDOR: your torch.distributed backend ("xccl", "hccl", ...)

    def probe(self) -> ProbeResult:
        # VENDOR: ask your runtime for its devices here. Never raise: every failure becomes a reason.
        try:
            mem = _meminfo()
            info = DeviceInfo(
                index=0, name=f"CPU ({os.cpu_count()} logical cores)",
                total_memory=mem[1] if mem else None, free_memory=mem[0] if mem else None,
                capabilities={"torch_threads": torch.get_num_threads()},
            )
            return ProbeResult(True, devices=(info,), details={"torch": torch.__version__})
        except Exception as exc:  # defensive: the contract forbids raising from probe()
            return ProbeResult(False, f"example-cpu detection failed: {type(exc).__name__}: {exc}")

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        # VENDOR: (free, total) of the device memory the KV cache will live in.
        mem = _meminfo()
        if mem is None:
            raise RuntimeError("example-cpu: cannot read /proc/meminfo; pass kv_cache_memory=<bytes>")
        return mem

    def supported_dtypes(self) -> list[torch.dtype]:
        # VENDOR: fastest first; dtype="auto" walks this list.
        return [torch.float32, torch.bfloat16]

    def configure(self, config: object) -> dict[str, object]:
        # VENDOR: engine settings your hardware needs (e.g. {"block_size": 64}); core applies and logs them.
        return {}
