"""Rotary position embedding (neox and GPT-J pairing, partial rotary) applied to query and key in one pass.

Each program rotates every head of one token, so the cos/sin row for that position is read once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_triton._common import check_device, next_pow2


@triton.jit
def _rotary_kernel(
    pos_ptr, x_ptr, out_ptr, cs_ptr,
    stride_xt, stride_xh, stride_ot, stride_oh, stride_cs,
    NUM_HEADS: tl.constexpr, HEAD: tl.constexpr, ROT: tl.constexpr,
    H_P2: tl.constexpr, HALF_P2: tl.constexpr, HEAD_P2: tl.constexpr, NEOX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    HALF: tl.constexpr = ROT // 2
    h = tl.arange(0, H_P2)
    i = tl.arange(0, HALF_P2)
    h_ok = h < NUM_HEADS
    i_ok = i < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + i, mask=i_ok, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + i, mask=i_ok, other=0.0).to(tl.float32)
    if NEOX:
        i1 = i
        i2 = i + HALF
    else:
        i1 = 2 * i
        i2 = 2 * i + 1
    m = h_ok[:, None] & i_ok[None, :]
    base = x_ptr + t * stride_xt + h[:, None] * stride_xh
    x1 = tl.load(base + i1[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + i2[None, :], mask=m, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    obase = out_ptr + t * stride_ot + h[:, None] * stride_oh
    tl.store(obase + i1[None, :], o1.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(obase + i2[None, :], o2.to(out_ptr.dtype.element_ty), mask=m)
    if ROT < HEAD:  # partial rotary: the remaining features pass through unchanged
        d = tl.arange(0, HEAD_P2)
        pm = h_ok[:, None] & (d[None, :] >= ROT) & (d[None, :] < HEAD)
        tl.store(obase + d[None, :], tl.load(base + d[None, :], mask=pm, other=0.0), mask=pm)


def _rotate(positions: torch.Tensor, x: torch.Tensor, cos_sin_cache: torch.Tensor, neox: bool) -> torch.Tensor:
    out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_heads, head = x.shape[1], x.shape[2]
    rot = cos_sin_cache.shape[-1]
    if rot > head or rot % 2:
        raise ValueError(f"rotary_dim {rot} must be even and <= head_size {head}")
    _rotary_kernel[(x.shape[0],)](
        positions, x, out, cos_sin_cache,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos_sin_cache.stride(0),
        NUM_HEADS=num_heads, HEAD=head, ROT=rot, H_P2=next_pow2(num_heads), HALF_P2=next_pow2(rot // 2),
        HEAD_P2=next_pow2(head), NEOX=bool(neox),
    )
    return out


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`llmctl.ops.reference.rotary_embedding`: returns new rotated (query, key)."""
    check_device(query, key, cos_sin_cache)
    positions = positions.contiguous()
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    return _rotate(positions, query, cs, is_neox_style), _rotate(positions, key, cs, is_neox_style)
