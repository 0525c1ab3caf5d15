"""llmctl's NVIDIA CUDA backend, found by core through the ``llmctl.plugins`` entry point ``cuda``.

The hooks are ``llmctl_gpu``'s, shared with the ROCm plugin; what is NVIDIA's own is the platform's detection
(``platform.py``, NVML), the FlashAttention and FlashInfer backends (``flash.py``) and the doctor checks.
Implementation modules are imported inside the hooks, and nothing here imports Triton or touches the GPU, so
loading the plugin on a CPU-only host is free and the platform's probe explains why it is unavailable.
"""

from __future__ import annotations

from typing import Any

from llmctl.plugins.types import AttentionBackend, DoctorCheck, Platform
from llmctl_gpu.hooks import GpuPluginHooks

LLMCTL_API_VERSION = "2.5"
PLATFORM = "cuda"


def _platform() -> Platform:
    from llmctl_cuda.platform import CudaPlatform

    return CudaPlatform()


def _attention_backends() -> list[AttentionBackend]:
    from llmctl_triton.backend import TritonAttentionBackend

    from llmctl_cuda.flash import FlashAttnBackend, FlashInferBackend

    return [TritonAttentionBackend(platform=PLATFORM, priority=10), FlashAttnBackend(), FlashInferBackend()]


def _doctor_checks() -> list[DoctorCheck]:
    from llmctl_cuda.doctor import doctor_checks

    return list(doctor_checks())


_hooks = GpuPluginHooks(PLATFORM, platform=_platform, attention_backends=_attention_backends,
                        communicator_name="nccl", doctor_checks=_doctor_checks)
llmctl_register_platforms = _hooks.llmctl_register_platforms
llmctl_register_attention_backends = _hooks.llmctl_register_attention_backends
llmctl_register_ops = _hooks.llmctl_register_ops
llmctl_register_quantization = _hooks.llmctl_register_quantization
llmctl_register_communicators = _hooks.llmctl_register_communicators
llmctl_doctor_checks = _hooks.llmctl_doctor_checks


def __getattr__(name: str) -> Any:
    # Convenience re-exports for benchmarks and tests (core reaches these only through the platform), resolved
    # lazily to keep loading cheap.
    if name == "CudaGraphRunner":
        from llmctl_gpu.graph_runner import CudaGraphRunner

        return CudaGraphRunner
    if name == "profile_kv_cache_size":
        from llmctl_gpu.profile import profile_kv_cache_size

        return profile_kv_cache_size
    if name == "CudaPlatform":
        from llmctl_cuda.platform import CudaPlatform

        return CudaPlatform
    raise AttributeError(f"module 'llmctl_cuda' has no attribute {name!r}")
