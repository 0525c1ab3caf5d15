"""llmctl's AMD ROCm backend, found by core through the ``llmctl.plugins`` entry point ``rocm``.

ROCm builds of torch expose HIP devices through ``torch.cuda`` (device type "cuda"), so the hooks, the graph
runner and the communicator are ``llmctl_gpu``'s and the kernels ``llmctl_triton``'s, unchanged; what is AMD's
own is the platform's detection and its doctor checks (``platform.py``).
"""

from __future__ import annotations

from typing import Any

from llmctl.plugins.types import AttentionBackend, DoctorCheck, Platform
from llmctl_gpu.hooks import GpuPluginHooks

LLMCTL_API_VERSION = "2.5"
PLATFORM = "rocm"


def _platform() -> Platform:
    from llmctl_rocm.platform import RocmPlatform

    return RocmPlatform()


def _attention_backends() -> list[AttentionBackend]:
    from llmctl_triton.backend import TritonAttentionBackend

    # Core's registry is keyed by backend name across platforms; "triton" is the CUDA plugin's instance.
    return [TritonAttentionBackend(platform=PLATFORM, priority=10, name="triton-rocm")]


def _doctor_checks() -> list[DoctorCheck]:
    from llmctl_rocm.platform import doctor_checks

    return list(doctor_checks())


_hooks = GpuPluginHooks(PLATFORM, platform=_platform, attention_backends=_attention_backends,
                        communicator_name="rccl", doctor_checks=_doctor_checks)
llmctl_register_platforms = _hooks.llmctl_register_platforms
llmctl_register_attention_backends = _hooks.llmctl_register_attention_backends
llmctl_register_ops = _hooks.llmctl_register_ops
llmctl_register_quantization = _hooks.llmctl_register_quantization
llmctl_register_communicators = _hooks.llmctl_register_communicators
llmctl_doctor_checks = _hooks.llmctl_doctor_checks


def __getattr__(name: str) -> Any:
    if name == "CudaGraphRunner":  # hipGraph through torch.cuda.CUDAGraph
        from llmctl_gpu.graph_runner import CudaGraphRunner

        return CudaGraphRunner
    if name == "profile_kv_cache_size":
        from llmctl_gpu.profile import profile_kv_cache_size

        return profile_kv_cache_size
    raise AttributeError(f"module 'llmctl_rocm' has no attribute {name!r}")
