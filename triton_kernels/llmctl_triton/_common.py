"""Small helpers shared by every kernel wrapper: interpreter detection, device checks, block-size picks."""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter. Triton reads ``TRITON_INTERPRET`` when a kernel is
    decorated, so this must already be set when :mod:`llmctl_triton` is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors: torch.Tensor) -> None:
    """Fail with an actionable message instead of a cryptic Triton error when a kernel gets CPU tensors.

    The interpreter runs kernels on CPU tensors (that is how CI tests them); compiled Triton needs a GPU."""
    if interpreting():
        return
    for t in tensors:
        if t.device.type == "cpu":
            raise RuntimeError("llmctl_triton kernels need GPU tensors (got a CPU tensor); set TRITON_INTERPRET=1 "
                               "before importing llmctl_triton to run them in Triton's CPU interpreter")


def upcast_for_dot(dtype: torch.dtype) -> bool:
    """The interpreter computes bf16 matmuls wrongly (numpy has no bf16), so kernels upcast to fp32 there.
    On a GPU bf16 goes to the tensor cores as is."""
    return interpreting() and dtype == torch.bfloat16


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors (CUs on ROCm) of ``device``; the split-K heuristic compares work against it."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: any small number keeps the heuristic meaningful
