"""Fused RMSNorm and add+RMSNorm: one read and one write of the hidden state per token.

The rounding points follow :mod:`llmctl.ops.reference` (normalise in float32, round to the input dtype, then
multiply by the weight in the promoted dtype), so results match the oracle to the last bit in most elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_triton._common import check_device, next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        s = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, s, mask=ok)
        x = s.to(tl.float32)
    var = tl.sum(x * x, 0) / n_cols
    # The reference rounds the normalised value to the dtype of the tensor it normalised (x, or the sum).
    normed = (x * tl.rsqrt(var + eps)).to(res_out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight``; same signature and dtype rules as the reference."""
    check_device(x, weight)
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, x2, weight.contiguous(), out, x2,  # x2 as res_out only supplies the rounding dtype
            x2.stride(0), 0, out.stride(0), 0, x2.shape[1], float(eps),
            HAS_RESIDUAL=False, BLOCK=next_pow2(x2.shape[1]),
        )
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + residual``; returns ``(rms_norm(residual), residual)`` without writing the sum to memory
    and reading it back. The inputs are not modified (as in the reference)."""
    check_device(x, residual, weight)
    x2, r2 = _rows(x), _rows(residual)
    res_dtype = torch.promote_types(x.dtype, residual.dtype)
    res_out = torch.empty(x2.shape, dtype=res_dtype, device=x.device)
    out = torch.empty(x2.shape, dtype=torch.promote_types(res_dtype, weight.dtype), device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight.contiguous(), out, res_out,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0), x2.shape[1], float(eps),
            HAS_RESIDUAL=True, BLOCK=next_pow2(x2.shape[1]),
        )
    return out.view(x.shape), res_out.view(x.shape)
