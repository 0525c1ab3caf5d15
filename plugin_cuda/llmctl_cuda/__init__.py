"""llmctl's NVIDIA CUDA backend, found by core through the ``llmctl.plugins`` entry point ``cuda``.

Implementation modules are imported inside the hooks, and nothing here imports Triton or touches the GPU, so
loading the plugin on a CPU-only host is free and the platform's probe explains why it is unavailable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmctl.plugins import hookimpl

LLMCTL_API_VERSION = "1.0"
PLATFORM = "cuda"


@hookimpl
def llmctl_register_platforms(register: Callable[[Any], None]) -> None:
    from llmctl_cuda.platform import CudaPlatform

    register(CudaPlatform())


@hookimpl
def llmctl_register_attention_backends(register: Callable[[Any], None]) -> None:
    from llmctl_triton.backend import TritonAttentionBackend

    from llmctl_cuda.flash import FlashAttnBackend, FlashInferBackend

    register(TritonAttentionBackend(platform=PLATFORM, priority=10))
    register(FlashAttnBackend())
    register(FlashInferBackend())


@hookimpl
def llmctl_register_ops(register: Callable[[Any], None]) -> None:
    from llmctl_triton.backend import op_overrides

    for op in op_overrides(PLATFORM):
        register(op)


@hookimpl
def llmctl_register_communicators(register: Callable[[Any], None]) -> None:
    from llmctl_triton.runtime import GpuCommunicator

    register(GpuCommunicator(name="nccl", platform=PLATFORM, backend="nccl"))


@hookimpl
def llmctl_doctor_checks(register: Callable[[Any], None]) -> None:
    from llmctl_cuda.doctor import doctor_checks

    for check in doctor_checks():
        register(check)


def __getattr__(name: str) -> Any:
    # Convenience re-exports for benchmarks and tests (core reaches these only through the platform), resolved
    # lazily to keep loading cheap.
    if name == "CudaGraphRunner":
        from llmctl_triton.runtime import CudaGraphRunner

        return CudaGraphRunner
    if name == "profile_kv_cache_size":
        from llmctl_triton.runtime import profile_kv_cache_size

        return profile_kv_cache_size
    if name == "CudaPlatform":
        from llmctl_cuda.platform import CudaPlatform

        return CudaPlatform
    raise AttributeError(f"module 'llmctl_cuda' has no attribute {name!r}")
