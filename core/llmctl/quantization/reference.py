"""Core's torch reference for each weight format: unpack, then matmul. The test oracle for every platform's
kernels and the fallback where a platform has none (registered for every platform at priority -100)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmctl.plugins.types import QUANT_FORMATS, QuantLinearSpec, QuantMethod, Support
from llmctl.quantization.packing import dequant_int4, dequant_int8

REFERENCE_PRIORITY = -100
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_TINY = 1e-12


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic per-row int8: (int8 [M, K], float32 scales [M, 1]); an all-zero row gets scale 1."""
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn values and float32 scales: per row (dynamic) when ``scale`` is None, else that scale."""
    xf = x.to(torch.float32)
    if scale is None:
        amax = xf.abs().amax(dim=-1, keepdim=True)
        scale = torch.clamp(amax / FP8_MAX, min=_TINY)
    q = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float32)


def dequantize_weight(weights: dict[str, torch.Tensor], spec: QuantLinearSpec) -> torch.Tensor:
    """float32 [N, K] in the layer's own column order (``perm`` not applied)."""
    if spec.format == "int4":
        return dequant_int4(weights["qweight"], weights["scales"], weights["mins"])
    if spec.format == "int8":
        return dequant_int8(weights["qweight"], weights["scales"], weights.get("mins"))
    if spec.format == "fp8":
        return weights["qweight"].to(torch.float32) * weights["scales"]
    if spec.format == "gguf":
        from llmctl.quantization.gguf import dequantize_blocks

        return dequantize_blocks(weights["qweight"], spec.ggml_type or "", spec.in_features)
    raise ValueError(f"quantization: unknown weight format {spec.format!r}")


def reference_linear(x: torch.Tensor, weights: dict[str, torch.Tensor], bias: torch.Tensor | None,
                     spec: QuantLinearSpec) -> torch.Tensor:
    """What every kernel must equal (within rounding): the dequantized weight's matmul in float32, activations
    quantized first where the format says so, the result in ``x``'s dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    perm = weights.get("perm")
    if perm is not None:
        x2 = x2.index_select(-1, perm)
    if spec.act == "int8":
        xq, xs = quantize_int8_per_token(x2)
        acc = torch.mm(xq.to(torch.int32), weights["qweight"].to(torch.int32).t())  # exact int32 sums
        out = acc.to(torch.float32) * xs * weights["scales"].view(1, -1)
    elif spec.act == "fp8":
        xq, xs = quantize_fp8(x2, weights.get("input_scale"))
        out = torch.mm(xq.to(torch.float32) * xs, dequantize_weight(weights, spec).t())
    else:
        out = torch.mm(x2.to(torch.float32), dequantize_weight(weights, spec).t())
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype).reshape(*shape[:-1], spec.out_features)


class ReferenceQuantKernel(QuantMethod):
    """Dequantizes the whole weight on every call: slow and memory-hungry for a step, but exact."""

    platforms = ("*",)
    priority = REFERENCE_PRIORITY

    def __init__(self, fmt: str) -> None:
        self.name = fmt
        self.kernel = f"torch reference ({fmt})"

    def supports(self, spec: QuantLinearSpec, dtype: torch.dtype) -> Support:
        return Support(True)

    def apply(self, x: torch.Tensor, weights: dict[str, torch.Tensor], bias: torch.Tensor | None,
              spec: QuantLinearSpec) -> torch.Tensor:
        if spec.act is None and spec.format != "gguf":
            # Weight-only: the dequantized weight in the activation dtype goes through the platform's own
            # GEMM path (F.linear); float32 accumulation is what reference_linear defines, and bf16 GEMMs
            # accumulate in float32 as well.
            perm = weights.get("perm")
            x2 = x if perm is None else x.index_select(-1, perm)
            w = dequantize_weight(weights, spec).to(x.dtype)
            return F.linear(x2, w, bias)
        return reference_linear(x, weights, bias, spec)


def reference_kernels() -> list[QuantMethod]:
    return [ReferenceQuantKernel(fmt) for fmt in QUANT_FORMATS]
