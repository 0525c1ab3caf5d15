"""8-bit KV caches in Triton: the quantizing write and the code conversions the attention kernels inline.

The layout is core's (``llmctl.kv.cache_dtype``): each (slot, KV head) row is ``head_size`` one-byte codes and then
the row's float32 scale. Kernels get the cache twice, as bytes (codes) and as float32 words (scales, at word
``head_size // 4`` of a row), which needs ``head_size % 4 == 0``. Codes are converted with integer and half-precision
bit operations rather than fp8 casts, so the same kernels run on GPUs without fp8 instructions and in the CPU
interpreter, and the write gives the torch reference's bytes (scale = amax / qmax, x / scale rounded half to even,
fp8 clamped first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_triton._common import check_device, next_pow2

# Format codes, a constexpr of the kernels (0: the cache holds the model dtype)
FMT_NONE, FMT_INT8, FMT_E4M3, FMT_E5M2 = 0, 1, 2, 3
FORMATS = {torch.int8: FMT_INT8, torch.float8_e4m3fn: FMT_E4M3, torch.float8_e5m2: FMT_E5M2}
QMAX = {FMT_INT8: 127.0, FMT_E4M3: 448.0, FMT_E5M2: 57344.0}
SCALE_BYTES = 4
_RNE_MAGIC = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds a float32 below 2^22 half to even


def cache_format(kv_cache: torch.Tensor) -> int:
    return FORMATS.get(kv_cache.dtype, FMT_NONE)


def code_and_scale_views(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One half (keys or values) of an 8-bit cache, [blocks, block_size, Hk, D + 4], as bytes and as float32 words."""
    if (cache.shape[-1] - SCALE_BYTES) % 4:
        raise ValueError(f"8-bit KV caches need head_size % 4 == 0 in Triton, got {cache.shape[-1] - SCALE_BYTES}")
    return cache.view(torch.uint8), cache.view(torch.uint8).view(torch.float32)


@triton.jit
def code_to_f32(c, FMT: tl.constexpr):
    """uint8 codes -> float32, unscaled (e4m3 comes out exact: read as a half with bias 15 and times 2^8)."""
    if FMT == 1:
        return c.to(tl.int8, bitcast=True).to(tl.float32)
    h = c.to(tl.uint16)
    if FMT == 3:
        return (h << 8).to(tl.float16, bitcast=True).to(tl.float32)
    bits = ((h & 0x7F) << 7) | ((h & 0x80) << 8)
    return bits.to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def _f32_to_code(y, FMT: tl.constexpr):
    """float32 already divided by the scale -> uint8 code, rounding as torch does."""
    if FMT == 1:
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        r = (y + 12582912.0) - 12582912.0
        return r.to(tl.int32).to(tl.int8).to(tl.uint8, bitcast=True)
    if FMT == 2:
        QM: tl.constexpr = 448.0
        MANT: tl.constexpr = 3
        BIAS: tl.constexpr = 7
        MIN_NORMAL: tl.constexpr = 0.015625
        SUB_STEPS: tl.constexpr = 512.0
    else:
        QM: tl.constexpr = 57344.0
        MANT: tl.constexpr = 2
        BIAS: tl.constexpr = 15
        MIN_NORMAL: tl.constexpr = 6.103515625e-05
        SUB_STEPS: tl.constexpr = 65536.0
    DROP: tl.constexpr = 23 - MANT
    y = tl.minimum(tl.maximum(y, -QM), QM)
    u = y.to(tl.uint32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    af = a.to(tl.float32, bitcast=True)
    steps = ((af * SUB_STEPS + 12582912.0) - 12582912.0).to(tl.uint32)  # subnormal codes (a carry: min normal)
    r = a + ((1 << (DROP - 1)) - 1) + ((a >> DROP) & 1)
    e = (r >> 23).to(tl.int32) - 127 + BIAS
    normal = (tl.maximum(e, 0).to(tl.uint32) << MANT) | ((r >> DROP) & ((1 << MANT) - 1))
    code = tl.where(af < MIN_NORMAL, steps, normal) | sign
    return code.to(tl.uint8)


@triton.jit
def _write_kv8_kernel(
    key_ptr, value_ptr, k_codes_ptr, v_codes_ptr, k_scales_ptr, v_scales_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_wb, stride_ws, stride_wh,
    BLOCK_SIZE: tl.constexpr, NUM_HEADS: tl.constexpr, NH_P2: tl.constexpr, HEAD: tl.constexpr,
    HEAD_P2: tl.constexpr, FMT: tl.constexpr, QMAX: tl.constexpr,
):
    # One program quantizes one token's [num_kv_heads, head_size] keys and values: one scale per head row.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    hh = tl.arange(0, NH_P2)
    d = tl.arange(0, HEAD_P2)
    slot_h = tl.zeros([NH_P2], tl.int64) + slot
    h_ok = (hh < NUM_HEADS) & (slot_h >= 0)
    ok = h_ok[:, None] & (d < HEAD)[None, :]
    blk = slot_h // BLOCK_SIZE
    off = slot_h % BLOCK_SIZE
    t64 = t.to(tl.int64)
    for which in tl.static_range(2):
        if which == 0:
            x = tl.load(key_ptr + t64 * stride_kt + hh[:, None] * stride_kh + d[None, :], mask=ok, other=0.0)
        else:
            x = tl.load(value_ptr + t64 * stride_vt + hh[:, None] * stride_vh + d[None, :], mask=ok, other=0.0)
        x = x.to(tl.float32)
        # div_rn: IEEE division, as torch's (a GPU's default float32 division is approximate)
        scale = tl.div_rn(tl.max(tl.abs(x), 1), tl.zeros_like(tl.max(tl.abs(x), 1)) + QMAX)
        scale = tl.where(scale > 0.0, scale, 1.0)
        codes = _f32_to_code(tl.div_rn(x, tl.zeros_like(x) + scale[:, None]), FMT)
        row = blk * stride_cb + off * stride_cs + hh * stride_ch
        word = blk * stride_wb + off * stride_ws + hh * stride_wh + HEAD // 4
        if which == 0:
            tl.store(k_codes_ptr + row[:, None] + d[None, :], codes, mask=ok)
            tl.store(k_scales_ptr + word, scale, mask=h_ok)
        else:
            tl.store(v_codes_ptr + row[:, None] + d[None, :], codes, mask=ok)
            tl.store(v_scales_ptr + word, scale, mask=h_ok)


def write_kv8(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """:func:`llmctl.ops.paged_attention.write_kv_reference` into an 8-bit ``kv_cache`` [2, blocks, block_size, Hk,
    D + 4], with the reference's bytes; slot ``-1`` leaves the cache untouched."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    check_device(key, value, kv_cache)
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    if not kv_cache.is_contiguous():
        raise ValueError("an 8-bit kv_cache must be contiguous")
    fmt = cache_format(kv_cache)
    _, _, block_size, num_heads, row = kv_cache.shape
    head = row - SCALE_BYTES
    kc, kw = code_and_scale_views(kv_cache[0])
    vc, vw = code_and_scale_views(kv_cache[1])
    slots = slot_mapping if slot_mapping.is_contiguous() else slot_mapping.contiguous()
    _write_kv8_kernel[(n,)](
        key, value, kc, vc, kw, vw, slots,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), kw.stride(0), kw.stride(1), kw.stride(2),
        BLOCK_SIZE=block_size, NUM_HEADS=num_heads, NH_P2=next_pow2(num_heads), HEAD=head,
        HEAD_P2=next_pow2(head), FMT=fmt, QMAX=QMAX[fmt],
    )
