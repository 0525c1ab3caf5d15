"""The ``example-cpu`` platform: what core asks a piece of hardware before running on it."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from llmctl.plugins.types import DecodeGraphSpec, DecodeStepRunner, DeviceInfo, Platform, ProbeResult

logger = logging.getLogger(__name__)


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
    # VENDOR: settings only your platform reads, name -> one-line description. Users pass them as engine keywords
    # (LLM(model, example_probe_log=True)); they arrive in config.platform_options and you apply them in configure.
    options = {"example_probe_log": "log the device the platform found when the engine starts (default: off)"}

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
        # VENDOR: apply your own options (config.platform_options) and return the engine settings your hardware
        # needs (e.g. {"block_size": 64}); core applies them where the user set nothing, and logs them.
        options = getattr(config, "platform_options", None) or {}
        if options.get("example_probe_log"):
            probe = self.probe()
            logger.info("example-cpu: %s", probe.devices[0].name if probe.devices else probe.reason)
        return {}

    def profile_kv_cache_bytes(self, run_forward: Callable[[], None], *, gpu_memory_utilization: float | None,
                               bytes_per_block: int, block_size: int, max_model_len: int,
                               device_index: int = 0) -> int | None:
        # VENDOR: a device with its own memory measures here: reset the allocator's peak, call run_forward() (one
        # step of the largest batch the scheduler can form), and return total * utilization - weights - peak.
        # Host memory is shared with everything else, so this template lets core take a share of memory_info.
        return None

    def prepare_kv_cache(self, kv_caches: list[torch.Tensor], num_blocks: int) -> None:
        # VENDOR: called once after core allocates the KV cache: fault pages in, pin or register the memory with
        # your DMA engine. Never change the tensors' shape, dtype or storage.
        return None

    def decode_step_runner(self, spec: DecodeGraphSpec) -> DecodeStepRunner | None:
        # VENDOR: where kernel launches dominate small decode batches, return a runner that captures
        # spec.forward once per spec.batch_sizes in your graph API and replays it (see DecodeStepRunner; your
        # attention backend must then declare supports_graph_capture = True). None runs every step eagerly.
        return None
