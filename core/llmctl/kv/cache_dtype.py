"""8-bit KV caches (``kv_cache_dtype``): the names, the storage layout and the torch reference of the quantization.

An 8-bit cache keeps one float32 scale per token and KV head, written when the token's keys and values are. The
scale lives in the same row as the codes: a head's row is ``head_size`` 8-bit codes followed by the 4 bytes of its
scale, so the last dimension of the cache tensor is ``head_size + 4`` (``kv_row_width``). Keeping the scale inside
the block is what lets every block operation stay unaware of quantization: a block handed to another request by the
prefix cache, freed by preemption and recomputed, or copied whole carries its scales with it.

The cache tensor's dtype says which format it holds: ``torch.int8``, ``torch.float8_e4m3fn`` or
``torch.float8_e5m2``; the scale bytes are reinterpreted (``Tensor.view``), never converted. Codes are
``x / scale`` rounded to the format (int8 rounds half to even and clamps to +-127; fp8 rounds to nearest even and
is clamped to the format's largest finite value first), with ``scale = amax / qmax`` over the head's row, so the
largest element of each row is represented exactly at the top of the range. The C and Triton kernels reproduce these
operations step for step.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "int8")
SCALE_BYTES = 4  # one float32 per (token, KV head), after the row's codes

_STORAGE = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
            "int8": torch.int8}
QUANTIZED_KV_DTYPES = frozenset(_STORAGE.values())
# The largest code of each format: int8 is kept symmetric (-127..127), fp8 at its largest finite value.
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
# The attention feature a backend must accept to be given a cache of that dtype (see MODEL_ATTENTION_FEATURES).
_FEATURES = {torch.int8: "kv_cache_int8", torch.float8_e4m3fn: "kv_cache_fp8_e4m3",
             torch.float8_e5m2: "kv_cache_fp8_e5m2"}
KV_CACHE_FEATURES = frozenset(_FEATURES.values())


def normalize_kv_cache_dtype(value: object) -> str:
    """The checked name; raises naming ``kv_cache_dtype`` and the allowed values for anything else."""
    if value is None:
        return "auto"
    if not isinstance(value, str) or value.strip().lower() not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: must be one of {', '.join(KV_CACHE_DTYPES)}, got {value!r}")
    return value.strip().lower()


def kv_storage_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensor's dtype for ``kv_cache_dtype=name``: the model's own for ``auto``."""
    return _STORAGE.get(normalize_kv_cache_dtype(name), model_dtype)


def is_quantized_kv(dtype: torch.dtype) -> bool:
    return dtype in QUANTIZED_KV_DTYPES


def kv_feature(dtype: torch.dtype) -> str | None:
    """``kv_cache_int8`` / ``kv_cache_fp8_e4m3`` / ``kv_cache_fp8_e5m2`` for an 8-bit cache dtype, else None."""
    return _FEATURES.get(dtype)


def kv_dtype_name(dtype: torch.dtype) -> str:
    return {torch.int8: "int8", torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}.get(
        dtype, str(dtype).replace("torch.", ""))


def kv_row_width(head_size: int, dtype: torch.dtype) -> int:
    """Elements in the last dimension of the cache for one head: the codes plus the scale's bytes when 8-bit."""
    return head_size + SCALE_BYTES if is_quantized_kv(dtype) else head_size


def kv_head_size(cache: torch.Tensor) -> int:
    """The head size a cache holds (its last dimension minus the scale bytes when 8-bit)."""
    return cache.shape[-1] - (SCALE_BYTES if is_quantized_kv(cache.dtype) else 0)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [..., D] -> (codes [..., D] of ``dtype``, scales [...] float32): one scale per row (a token's head)."""
    xf = x.float()
    qmax = QMAX[dtype]
    scale = xf.abs().amax(dim=-1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: codes 0, any scale
    y = xf / scale.unsqueeze(-1)
    if dtype is torch.int8:
        codes = y.round().clamp(-qmax, qmax).to(torch.int8)
    else:
        codes = y.clamp(-qmax, qmax).to(dtype)
    return codes, scale


def pack_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` [..., D] -> [..., D + 4] of ``dtype``: the codes followed by the float32 scale's bytes."""
    codes, scale = quantize_rows(x, dtype)
    out = torch.empty((*x.shape[:-1], x.shape[-1] + SCALE_BYTES), dtype=dtype, device=x.device)
    out[..., : x.shape[-1]] = codes
    row_scales(out).copy_(scale)
    return out


def row_scales(rows: torch.Tensor) -> torch.Tensor:
    """The float32 scales of packed rows [..., D + 4] as a view [...] (writable)."""
    return rows.view(torch.uint8)[..., -SCALE_BYTES:].view(torch.float32).squeeze(-1)


def dequantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """Packed rows [..., D + 4] -> float32 [..., D] (codes times their row's scale)."""
    head_size = rows.shape[-1] - SCALE_BYTES
    return rows[..., :head_size].float() * row_scales(rows).unsqueeze(-1)
