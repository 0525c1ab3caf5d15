"""GGUF Q2_K and Q3_K on the CPU plugin's int8 group kernel.

Core keeps these two block types as raw blocks, and its reference dequantizes the whole weight with the gguf
package on every call, which makes a layer tens of times slower than its dense matmul. Both types are 16-weight
sub-blocks with one float scale (Q2_K also a min) each, so they unpack exactly into int8 values with groups of 16,
which the int8 weight-only GEMM already runs on AVX-512 and AVX2 builds. The price is memory: 8 bits per weight plus
the float32 group scale (and min) instead of 2.6 / 3.4 bits, still below bf16's 16.

Unpacking mirrors the gguf package's dequantizer operation for operation (``w = d * sc * q - dmin * m`` for Q2_K,
``w = d * (sc - 32) * q`` for Q3_K), so ``q * scale + min`` gives the same floats.
"""

from __future__ import annotations

import torch
from llmctl.plugins.types import QuantLinearSpec, QuantMethod, Support

from llmctl_cpu.quant import _as_f32_2d, _build_words, _load, _weight_only_gemm, _weight_only_process, quant_kernels

KBLOCK_TYPES = {"Q2_K": 84, "Q3_K": 110}  # bytes per 256-weight super-block
_QK = 256


def _fp16(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[..., at:at + 2].contiguous().view(torch.float16).to(torch.float32)  # [..., 1]


def _two_bit_planes(qs: torch.Tensor) -> torch.Tensor:
    """[..., 64] bytes -> [..., 256] values: element h*128 + j*32 + l is bits 2j..2j+1 of byte h*32 + l."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 4, 1)
    q = (qs.reshape(*qs.shape[:-1], 2, 1, 32) >> shifts) & 3
    return q.reshape(*qs.shape[:-1], _QK)


def unpack_kblocks(raw: torch.Tensor, type_name: str, k: int) -> dict[str, torch.Tensor]:
    """Raw Q2_K / Q3_K rows [N, row_bytes] -> int8 ``qweight`` [N, K], float32 ``scales`` (and Q2_K's ``mins``)
    [N, K / 16]: core's int8 format with groups of 16."""
    n = raw.shape[0]
    b = raw.reshape(n, k // _QK, KBLOCK_TYPES[type_name])
    if type_name == "Q2_K":
        sc, d, dmin = b[..., 0:16], _fp16(b, 80), _fp16(b, 82)
        q = _two_bit_planes(b[..., 16:80]).to(torch.int8)
        scales = d * (sc & 0xF).to(torch.float32)
        mins = -(dmin * (sc >> 4).to(torch.float32))
        return {"qweight": q.reshape(n, k), "scales": scales.reshape(n, k // 16), "mins": mins.reshape(n, k // 16)}
    hmask, packed, d = b[..., 0:32], b[..., 96:108], _fp16(b, 108)
    low = torch.cat((packed[..., 0:8] & 0xF, packed[..., 0:8] >> 4), dim=-1)  # sub-blocks 0-7, 8-15
    high = (packed[..., 8:12].unsqueeze(-2) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)) & 3
    sc = (low | (high.reshape(*low.shape) << 4)).to(torch.int8) - 32
    ql = _two_bit_planes(b[..., 32:96]).to(torch.int8)
    bits = (hmask.unsqueeze(-2) >> torch.arange(8, dtype=torch.uint8).view(8, 1)) & 1  # element j*32 + l
    q = ql - ((bits.reshape(*ql.shape) ^ 1) << 2).to(torch.int8)
    scales = d * sc.to(torch.float32)
    return {"qweight": q.reshape(n, k), "scales": scales.reshape(n, k // 16)}


class CpuKBlockKernel(QuantMethod):
    """GGUF Q2_K / Q3_K, unpacked at load into int8 groups of 16 for the int8 weight-only GEMM."""

    name = "gguf"
    platforms = ("cpu",)
    priority = 10

    @property
    def kernel(self) -> str:  # type: ignore[override]
        return f"cpu int8 group-16 gemm on unpacked Q2_K/Q3_K ({_build_words(quant_kernels())})"

    def supports(self, spec: QuantLinearSpec, dtype: torch.dtype) -> Support:
        if quant_kernels() is None:
            return Support(False, f"CPU quantization kernels unavailable ({_load()[1]})")
        if spec.ggml_type not in KBLOCK_TYPES:
            return Support(False, f"GGUF type {spec.ggml_type} has no CPU kernel here")
        if spec.in_features % _QK:
            return Support(False, f"in_features {spec.in_features} is not a multiple of {_QK}")
        return Support(True)

    def process_weights(self, weights: dict[str, torch.Tensor], spec: QuantLinearSpec) -> dict[str, torch.Tensor]:
        lib = quant_kernels()
        assert lib is not None and spec.ggml_type is not None
        return _weight_only_process(lib, unpack_kblocks(weights["qweight"], spec.ggml_type, spec.in_features), 8, 16)

    def apply(self, x: torch.Tensor, weights: dict[str, torch.Tensor], bias: torch.Tensor | None,
              spec: QuantLinearSpec) -> torch.Tensor:
        lib = quant_kernels()
        assert lib is not None
        shape = x.shape
        b = None if bias is None else bias.to(torch.float32).contiguous()
        y = _weight_only_gemm(lib, _as_f32_2d(x), weights, 8, 16, b, spec.out_features)
        return y.to(x.dtype).reshape(*shape[:-1], spec.out_features)
