"""``write_kv``: scatter this step's keys and values into the paged cache by flat slot (reshape-and-cache)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_triton._common import check_device, next_pow2


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    stride_vcb, stride_vcs, stride_vch,
    BLOCK_SIZE: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD: tl.constexpr, HD_P2: tl.constexpr,
):
    # One program copies one token's [num_kv_heads, head_size] for K and V; heads and features are flattened
    # into one vector so a token is a single coalesced load/store per tensor.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, HD_P2)
    h = offs // HEAD
    d = offs % HEAD
    # Broadcast the slot to a vector before comparing: scalar & vector masks trip Triton's interpreter.
    slot_v = tl.zeros([HD_P2], tl.int64) + slot
    ok = (offs < NUM_HEADS * HEAD) & (slot_v >= 0)
    blk = slot_v // BLOCK_SIZE
    off = slot_v % BLOCK_SIZE
    t64 = t.to(tl.int64)
    k = tl.load(key_ptr + t64 * stride_kt + h * stride_kh + d, mask=ok, other=0.0)
    v = tl.load(value_ptr + t64 * stride_vt + h * stride_vh + d, mask=ok, other=0.0)
    tl.store(k_cache_ptr + blk * stride_cb + off * stride_cs + h * stride_ch + d,
             k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + d,
             v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Same contract as :func:`llmctl.ops.paged_attention.write_kv_reference`: ``kv_cache`` is
    ``[2, num_blocks, block_size, num_kv_heads, head_size]``; slot ``-1`` leaves the cache untouched."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    check_device(key, value, kv_cache)
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache must have a contiguous head dimension")
    _, _, block_size, num_heads, head = kv_cache.shape
    kc, vc = kv_cache[0], kv_cache[1]
    slots = slot_mapping if slot_mapping.is_contiguous() else slot_mapping.contiguous()
    _write_kv_kernel[(n,)](
        key, value, kc, vc, slots,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2),
        BLOCK_SIZE=block_size, NUM_HEADS=num_heads, HEAD=head, HD_P2=next_pow2(num_heads * head),
    )
