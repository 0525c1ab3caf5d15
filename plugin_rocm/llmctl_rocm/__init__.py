"""llmctl's AMD ROCm backend, found by core through the ``llmctl.plugins`` entry point ``rocm``.

ROCm builds of torch expose HIP devices through ``torch.cuda`` (device type "cuda"), so the Triton kernels,
the graph runner and the communicator come unchanged from the shared ``llmctl-triton`` library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmctl.plugins import hookimpl

LLMCTL_API_VERSION = "1.0"
PLATFORM = "rocm"


@hookimpl
def llmctl_register_platforms(register: Callable[[Any], None]) -> None:
    from llmctl_rocm.platform import RocmPlatform

    register(RocmPlatform())


@hookimpl
def llmctl_register_attention_backends(register: Callable[[Any], None]) -> None:
    from llmctl_triton.backend import TritonAttentionBackend

    # Core's registry is keyed by backend name across platforms; "triton" is the CUDA plugin's instance.
    register(TritonAttentionBackend(platform=PLATFORM, priority=10, name="triton-rocm"))


@hookimpl
def llmctl_register_ops(register: Callable[[Any], None]) -> None:
    from llmctl_triton.backend import op_overrides

    for op in op_overrides(PLATFORM):
        register(op)


@hookimpl
def llmctl_register_communicators(register: Callable[[Any], None]) -> None:
    from llmctl_triton.runtime import GpuCommunicator

    # torch's "nccl" process-group backend is RCCL on ROCm builds.
    register(GpuCommunicator(name="rccl", platform=PLATFORM, backend="nccl"))


@hookimpl
def llmctl_doctor_checks(register: Callable[[Any], None]) -> None:
    from llmctl_rocm.platform import doctor_checks

    for check in doctor_checks():
        register(check)


def __getattr__(name: str) -> Any:
    if name == "CudaGraphRunner":  # hipGraph through torch.cuda.CUDAGraph
        from llmctl_triton.runtime import CudaGraphRunner

        return CudaGraphRunner
    if name == "profile_kv_cache_size":
        from llmctl_triton.runtime import profile_kv_cache_size

        return profile_kv_cache_size
    raise AttributeError(f"module 'llmctl_rocm' has no attribute {name!r}")
