"""The platform base NVIDIA and AMD share through torch's ``cuda`` API (HIP devices are torch "cuda" devices)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from llmctl.plugins.types import DecodeGraphSpec, Platform, ProbeResult

from llmctl_gpu.graph_runner import CudaGraphRunner
from llmctl_gpu.profile import gpu_memory_utilization_from_env, profile_kv_cache_size


class TorchCudaPlatform(Platform):
    """What NVIDIA and AMD platforms share through torch's ``cuda`` API (HIP devices are torch "cuda" devices):
    a probe that never raises, memory, dtypes, KV sizing by profiling and decode graphs.
    Subclasses detect the hardware."""

    device_type = "cuda"
    priority = 100
    vendor = "GPU"

    def probe(self) -> ProbeResult:
        try:
            return self._probe()
        except Exception as exc:  # the contract: never raise from probe
            return ProbeResult(False, f"{self.vendor} detection failed: {type(exc).__name__}: {exc}")

    def _probe(self) -> ProbeResult:
        raise NotImplementedError

    def has_bf16(self) -> bool:
        """Whether device 0 has native bf16 matrix instructions."""
        raise NotImplementedError

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(device_index)
        return int(free), int(total)

    def supported_dtypes(self) -> list[torch.dtype]:
        try:
            bf16 = torch.cuda.is_available() and self.has_bf16()
        except Exception:
            bf16 = False
        return ([torch.bfloat16] if bf16 else []) + [torch.float16, torch.float32]

    def configure(self, config: Any) -> dict[str, Any]:
        """Resolve ``LLMCTL_GPU_MEMORY_UTILIZATION`` into the engine's ``gpu_memory_utilization`` here, so a bad
        value fails before the weights load and the value the KV profile uses shows up in core's log."""
        if getattr(config, "kv_cache_memory", None) is None and getattr(config, "gpu_memory_utilization", None) is None:
            return {"gpu_memory_utilization": gpu_memory_utilization_from_env()}
        return {}

    def profile_kv_cache_bytes(
        self,
        run_forward: Callable[[], None],
        *,
        gpu_memory_utilization: float | None,
        bytes_per_block: int,
        block_size: int,
        max_model_len: int,
        device_index: int = 0,
    ) -> int | None:
        """GPU memory is the engine's alone, so the KV cache takes what the card has left at the user's
        utilization after the weights and the worst step's activations (see :func:`profile_kv_cache_size`)."""
        util = gpu_memory_utilization if gpu_memory_utilization is not None else gpu_memory_utilization_from_env()
        return profile_kv_cache_size(run_forward, util, bytes_per_block=bytes_per_block, block_size=block_size,
                                     max_model_len=max_model_len, device=device_index)

    def decode_step_runner(self, spec: DecodeGraphSpec) -> CudaGraphRunner:
        """CUDA graphs on NVIDIA; on ROCm builds ``torch.cuda.CUDAGraph`` records a hipGraph through the same
        API, so AMD GPUs replay decode steps the same way (``enforce_eager`` turns both off)."""
        return CudaGraphRunner(spec.forward, spec.static_inputs, batch_sizes=spec.batch_sizes,
                               extra_rows=spec.extra_rows, pad_fn=spec.pad_fn)
