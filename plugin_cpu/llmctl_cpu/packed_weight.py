"""What the CPU plugin's ``pack_linear_weight`` and ``pack_gated_linear_weight`` hand back to core.

A packed buffer is padded, reordered or in a library's private layout, so its tensor shape says nothing about
the projection: the wrapper carries the format and the logical ``[out, in]`` shape beside the buffer, and
``linear`` dispatches on the format instead of on marker attributes set on tensors. Core treats it as opaque and
only passes it back to this plugin's ``linear`` / ``gated_linear``. oneDNN's blocked layout stays a plain
(``is_mkldnn``) tensor: torch itself types that one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class PackedFormat(enum.Enum):
    BF16_PANELS = "bf16_panels"  # the C bf16 GEMM's 32-column panels
    F32_PANELS = "f32_panels"  # the C float32 GEMM's panels
    MKL_F32 = "mkl_f32"  # MKL's packed sgemm buffer (the GEMM's B, transposed)
    GATED_BF16_PANELS = "gated_bf16_panels"  # gate/up rows interleaved by 16, SiLU-and-mul in the epilogue


@dataclass(frozen=True, slots=True)
class PackedWeight:
    data: torch.Tensor
    format: PackedFormat
    out_features: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        """The logical ``[out, in]`` shape of the weight that was packed (``data`` is padded)."""
        return self.out_features, self.in_features

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype


def packed(data: torch.Tensor, fmt: PackedFormat, weight: torch.Tensor) -> PackedWeight:
    return PackedWeight(data, fmt, int(weight.shape[0]), int(weight.shape[1]))


@dataclass(frozen=True, slots=True)
class PackedExperts:
    """One of a MoE layer's two stacked expert weights as ``fused_moe``'s C kernel reads it (``llmctl_cpu.moe``):
    ``data`` holds every expert's 16-column panels, ``shape`` is the logical ``[E, out, in]``."""
    data: torch.Tensor
    num_experts: int
    out_features: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.num_experts, self.out_features, self.in_features

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype
