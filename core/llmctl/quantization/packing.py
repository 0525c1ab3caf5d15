"""Bit layouts: core's canonical int4 nibbles and the int32 packings GPTQ, AWQ and compressed-tensors write.

Every checkpoint format is unpacked into plain integer values here, then repacked into core's layout (see
``QuantLinearSpec``), so one kernel per layout serves all of them.
"""

from __future__ import annotations

import torch

# AWQ's GEMM kernels pack eight 4-bit values into an int32 in this order of output columns (AutoAWQ's
# ``AWQ_ORDER``), so that the CUDA dequantizer's shifts produce columns 0..7 in sequence.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[..., K] values 0..15 -> uint8 [..., K // 2], element 2j in the low nibble of byte j."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> uint8 [..., K] values 0..15 (inverse of :func:`pack_nibbles`)."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words each holding ``32 // bits`` unsigned values, lowest bits first, along ``dim`` -> int32
    values, that dim ``32 // bits`` times longer (GPTQ packs ``qweight`` along K and ``qzeros`` along N;
    compressed-tensors packs along K)."""
    per = 32 // bits
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    p = packed.to(torch.int32).movedim(dim, -1).unsqueeze(-1)
    values = (p >> shifts) & mask  # arithmetic shift, then masked: the sign bit does not leak in
    values = values.flatten(-2)
    assert values.shape[-1] == packed.shape[dim] * per
    return values.movedim(-1, dim)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`unpack_int32` (used by tests that write checkpoints in the published layouts)."""
    per = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    if v.shape[-1] % per:
        raise ValueError(f"{v.shape[-1]} values do not fill whole int32 words of {per}")
    v = v.reshape(*v.shape[:-1], -1, per)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (v << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim)


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM packing: int32 [R, N // 8] -> int32 [R, N] values 0..15, columns in their real order."""
    v = unpack_int32(packed, 4, dim=1)  # [R, N] in packed order
    r, n = v.shape
    v = v.reshape(r, n // 8, 8)
    inverse = [AWQ_PACK_ORDER.index(i) for i in range(8)]
    return v[:, :, inverse].reshape(r, n)


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    r, n = values.shape
    v = values.reshape(r, n // 8, 8)[:, :, list(AWQ_PACK_ORDER)].reshape(r, n)
    return pack_int32(v, 4, dim=1)


def dequant_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Canonical int4 -> float32 [N, K]: ``scales * q + mins`` per group."""
    q = unpack_nibbles(qweight).to(torch.float32)
    n, k = q.shape
    g = scales.shape[1]
    w = q.view(n, g, k // g) * scales.unsqueeze(-1) + mins.unsqueeze(-1)
    return w.view(n, k)


def dequant_int8(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    n, k = qweight.shape
    g = scales.shape[1]
    w = qweight.to(torch.float32).view(n, g, k // g) * scales.unsqueeze(-1)
    if mins is not None:
        w = w + mins.unsqueeze(-1)
    return w.view(n, k)


def groups_to_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
                   ) -> dict[str, torch.Tensor]:
    """Unsigned 4-bit values ``q`` [N, K] with ``w = scales * (q - zeros)`` per group ([N, G]) -> the canonical
    int4 tensors (``mins = -scales * zeros``)."""
    scales = scales.to(torch.float32).contiguous()
    zeros_f = torch.zeros_like(scales) if zeros is None else zeros.to(torch.float32)
    return {"qweight": pack_nibbles(q).contiguous(), "scales": scales, "mins": (-scales * zeros_f).contiguous()}
