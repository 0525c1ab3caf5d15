"""CPU op overrides, kept only where measured faster than the reference.

float32 stays bit-identical to the reference everywhere except the GEMMs (float32 is the exactness dtype).
bfloat16 runs the C kernels of ``llmctl_cpu.native`` where they are built: rotary embedding (bit-identical), the
GEMMs on prepacked panels with SiLU-and-mul inside the gate/up one, RMSNorm in one pass (2-4x faster than torch's
passes; rare elements a bf16 ulp or two off, from the order of its sum of squares) and the greedy argmax, on AVX-512
and on AVX2 + FMA hosts. silu_and_mul on its own stays on torch: a C pass measured
no faster.

``torch.nn.functional.rms_norm`` *with* the weight multiplies in float32 before rounding, which differs from
the reference (and Hugging Face) by one bf16 ulp; normalising without the weight and multiplying afterwards
rounds at the same point as the reference, so the torch path's results are bit-identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from llmctl.ops import reference
from llmctl.plugins.types import OpOverride

from llmctl_cpu import f32_linear, mkl_sgemm, moe, native
from llmctl_cpu.packed_weight import PackedFormat, PackedWeight, packed


def _native_norm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Rows the C RMSNorm reads: bfloat16 only (float32 stays bit-identical to the reference on torch), unit stride
    along the normalised dim, one stride between rows."""
    return (x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1
            and x.is_cpu and weight.is_contiguous() and weight.shape == x.shape[1:] and x.shape[1] > 0)


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), None, eps) * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """bfloat16 rows go through one C pass (2-4x faster than torch's passes from 1 to 1024 rows of 576 on AVX-512,
    about 2x on a shared AVX2 host); its sum of squares adds in another order than the reference, which moves rare
    elements by a bfloat16 ulp or two."""
    if _native_norm_ok(x, weight):
        lib = native.kernels()
        if lib is not None and lib.has_norm:
            return lib.rms_norm(x, weight, eps)[0]
    return _torch_rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    if _native_norm_ok(x, weight) and residual.shape == x.shape and residual.dtype is x.dtype and \
            residual.stride(1) == 1:
        lib = native.kernels()
        if lib is not None and lib.has_norm:
            return lib.rms_norm(x, weight, eps, residual)  # the sum is a new tensor, as below
    residual = x + residual  # a new tensor: callers may still hold the old residual
    return _torch_rms_norm(residual, weight, eps), residual


def sampled_logprobs(x: torch.Tensor, chosen: torch.Tensor, k: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two C passes per row (the max; then the exponentials, the rank count and the top k) instead of the
    reference's five torch passes over rows x vocabulary; rows holding a NaN or +inf go to the reference."""
    lib = native.kernels()
    if (lib is None or not lib.has_argmax or x.dtype is not torch.float32 or x.dim() != 2 or not x.is_cpu
            or x.stride(1) != 1 or not 0 <= k <= x.shape[1]):
        return reference.sampled_logprobs(x, chosen, k)
    chosen = chosen.to(torch.int64).contiguous()
    lse, ranks, vals, ids, bad = lib.sampled_logprobs(x, chosen, k)
    sampled = x.gather(1, chosen.unsqueeze(1)).squeeze(1) - lse
    vals = vals - lse.unsqueeze(1)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        ref = reference.sampled_logprobs(x[rows], chosen[rows], k)
        sampled[rows], ranks[rows], vals[rows], ids[rows] = ref
    return sampled, ranks, vals, ids


def sample_softmax(logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Three C reads per row, nothing written (the max; the exponentials' sum; the running sum up to the drawn
    token, by blocks), instead of the reference's six torch passes; rows it cannot draw go to the reference."""
    lib = native.kernels()
    if (lib is None or not lib.has_argmax or logits.dtype is not torch.float32 or logits.dim() != 2
            or not logits.is_cpu or logits.stride(1) != 1 or logits.shape[1] == 0):
        return reference.sample_softmax(logits, temperatures, uniforms)
    temps = temperatures.to(torch.float32).contiguous()
    u = uniforms.to(torch.float32).contiguous()
    ids, bad = lib.sample_softmax(logits, temps, u)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        ids[rows] = reference.sample_softmax(logits[rows], temps[rows], u[rows])
    return ids


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor,
                     is_neox_style: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One C call per tensor instead of ~20 torch ops (a third of a millisecond per decode step at batch 1 with
    30 layers); bit-identical to the reference, which it falls back to for shapes the kernel does not take."""
    lib = native.kernels()
    if lib is None or not _rotary_ok(positions, query, key, cos_sin_cache):
        return reference.rotary_embedding(positions, query, key, cos_sin_cache, is_neox_style)
    positions = positions.contiguous()
    q_out = torch.empty(query.shape, dtype=query.dtype)
    k_out = torch.empty(key.shape, dtype=key.dtype)
    lib.rotary(positions, query, q_out, cos_sin_cache, is_neox_style)
    lib.rotary(positions, key, k_out, cos_sin_cache, is_neox_style)
    return q_out, k_out


def _rotary_ok(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin: torch.Tensor) -> bool:
    def rows_ok(x: torch.Tensor) -> bool:
        return (x.dim() == 3 and native.dtype_code(x.dtype) is not None and x.device.type == "cpu"
                and x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.shape[2] <= native.MAX_ROTARY_HEAD_SIZE)

    return (rows_ok(query) and rows_ok(key) and query.shape[0] == key.shape[0] == positions.shape[0]
            and query.shape[2] == key.shape[2] and positions.dtype == torch.int64 and positions.dim() == 1
            and cos_sin.dtype == torch.float32 and cos_sin.is_contiguous() and cos_sin.dim() == 2
            and cos_sin.shape[1] % 2 == 0 and cos_sin.shape[1] <= query.shape[2])


def greedy_sample(logits: torch.Tensor) -> torch.Tensor:
    """One C pass over the logits in their own dtype, instead of the reference's float32 copy and a second pass
    (torch has no vectorised bf16 argmax on AVX2 hosts); the same indices, ties and NaNs included."""
    if (logits.dim() == 2 and logits.shape[1] > 0 and logits.is_cpu and logits.stride(1) == 1
            and native.dtype_code(logits.dtype) is not None):
        lib = native.kernels()
        if lib is not None and lib.has_argmax:
            return lib.argmax_rows(logits)
    return reference.greedy_sample(logits)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]).mul_(x[..., d:])  # in place on silu's fresh output: one allocation fewer


# oneDNN picks a weight layout for an expected batch; decode batches are small, and prefill-sized inputs run
# as fast on it as on the plain layout (measured: M=8192 equal, M=64 1.2x, M=1 1.9x faster than F.linear).
_PACK_BATCH_HINT = 64


def _onednn_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _onednn() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available())
    except (AttributeError, RuntimeError):
        return False


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | PackedWeight:
    """bfloat16 weights go into the C GEMM's panels where the CPU has bf16 dot products, float32 weights to the
    batch-invariant GEMM :mod:`llmctl_cpu.f32_linear` picks for this host (MKL's packed GEMM where its self-check
    passes, else the float32 C GEMM), and anything else into oneDNN's blocked layout; either way once, so no GEMM
    reorders them again. Where each is faster is in docs/performance.md.
    """
    if weight.device.type != "cpu" or weight.dim() != 2:
        return weight
    if weight.dtype == torch.float32 and weight.shape[1] > 0:
        path = f32_linear.path_for(weight)
        if path == "mkl":
            return mkl_sgemm.pack(weight)
        if path == "c":
            lib = native.kernels()
            assert lib is not None
            panels = lib.pack_f32_panels(weight if weight.stride(1) == 1 else weight.contiguous())
            return packed(panels, PackedFormat.F32_PANELS, weight)
    if weight.dtype == torch.bfloat16:
        lib = native.kernels()
        if lib is not None and lib.has_gemm_bf16 and weight.stride(1) == 1 and weight.shape[1] > 0:
            return packed(lib.pack_bf16_panels(weight), PackedFormat.BF16_PANELS, weight)
    if (weight.dtype == torch.bfloat16 and _onednn_bf16()) or (weight.dtype == torch.float32 and _onednn()):
        blocked = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_BATCH_HINT)
        _warm_up(blocked, weight)
        return blocked
    return weight


def _panel_rows(x: torch.Tensor, k: int, op: str) -> torch.Tensor:
    """``x`` as the [rows, k] bf16 rows (unit stride along k) a packed-panel GEMM reads; the error names ``op``."""
    if x.shape[-1] != k:
        raise ValueError(f"{op}: input has {x.shape[-1]} features, the weight expects {k}")
    if x.dtype is not torch.bfloat16:
        raise TypeError(f"{op}: input is {x.dtype}, the packed weight is torch.bfloat16")
    rows = x if x.dim() == 2 else x.reshape(-1, k)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _panel_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = weight.shape
    rows = _panel_rows(x, k, "linear")
    lib = native.kernels()
    assert lib is not None  # the weight was packed by it
    if bias is not None and (bias.dtype is not torch.bfloat16 or not bias.is_contiguous()):
        bias = bias.to(torch.bfloat16).contiguous()  # layers keep a bf16 bias already: no copy per call
    out = lib.gemm_bf16(rows, weight.data, n, bias)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n)


def _f32_panel_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: input has {x.shape[-1]} features, the weight expects {k}")
    if x.dtype is not torch.float32:
        raise TypeError(f"linear: input is {x.dtype}, the packed weight is torch.float32")
    rows = x if x.dim() == 2 else x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    lib = native.kernels()
    assert lib is not None  # the weight was packed by it
    if bias is not None and (bias.dtype is not torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    out = lib.gemm_f32(rows, weight.data, n, bias)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n)


# oneDNN builds (JIT-compiles, ~0.5 ms) and caches one primitive per GEMM shape, about 0.3 MB each. A server sees
# every row count from 1 to the step budget, so with raw shapes it kept compiling and its memory grew with each new
# size (47 MB over a 768-request storm test). Row counts are therefore bucketed — exact up to 8, then multiples of
# 16 — and GEMMs of more than CHUNK_ROWS rows run in CHUNK_ROWS pieces (3-5 % slower for bf16 prefill GEMMs,
# measured at 1024 rows): 24 shapes per weight shape, all compiled when the first weight of that shape is packed.
CHUNK_ROWS = 256
_warmed: set[tuple[torch.dtype, tuple[int, ...]]] = set()


def padded_rows(m: int) -> int:
    """The row count (``1 <= m <= CHUNK_ROWS``) a packed GEMM of ``m`` rows runs at."""
    return m if m <= 8 else -(-m // 16) * 16


def _bucket_sizes() -> list[int]:
    return sorted({padded_rows(m) for m in range(1, CHUNK_ROWS + 1)})


def _packed_gemm(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m = rows.shape[0]
    padded = padded_rows(m)
    if padded != m:
        buffer = torch.empty((padded, rows.shape[1]), dtype=rows.dtype)
        buffer[:m] = rows
        buffer[m:].zero_()
        rows = buffer
    return torch.ops.mkldnn._linear_pointwise(rows.contiguous(), weight, bias, "none", [], "")[:m]


def _warm_up(packed: torch.Tensor, weight: torch.Tensor) -> None:
    """Compile every bucket's primitive for this weight shape now, so serving never grows the cache."""
    key = (weight.dtype, tuple(weight.shape))
    if key in _warmed:
        return
    _warmed.add(key)
    with torch.inference_mode():
        for m in _bucket_sizes():
            _packed_gemm(torch.zeros((m, weight.shape[1]), dtype=weight.dtype), packed, None)


_PACKED_LINEARS = {
    PackedFormat.BF16_PANELS: _panel_linear,
    PackedFormat.F32_PANELS: _f32_panel_linear,
    PackedFormat.MKL_F32: mkl_sgemm.linear,
}


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(weight, PackedWeight):
        run = _PACKED_LINEARS.get(weight.format)
        if run is None:
            raise TypeError(f"linear: a {weight.format.value} weight belongs to another op (gated_linear)")
        return run(x, weight, bias)
    if not weight.is_mkldnn:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    if m <= CHUNK_ROWS:
        out = _packed_gemm(rows, weight, bias)
    else:
        out = torch.empty((m, weight.shape[0]), dtype=rows.dtype)
        for i in range(0, m, CHUNK_ROWS):
            out[i:i + CHUNK_ROWS] = _packed_gemm(rows[i:i + CHUNK_ROWS], weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def _interleave_gate_up(t: torch.Tensor) -> torch.Tensor:
    """Gate rows [0, d) and up rows [d, 2d) -> 16 gate rows, 16 up rows, 16 gate rows, ...: the C GEMM's
    panels then alternate gate and up, so one register tile holds both halves of the same output columns."""
    d = t.shape[0] // 2
    gate, up = t[:d].reshape(d // 16, 16, *t.shape[1:]), t[d:].reshape(d // 16, 16, *t.shape[1:])
    return torch.stack((gate, up), dim=1).reshape(t.shape)


def pack_gated_linear_weight(weight: torch.Tensor, bias: torch.Tensor | None = None
                             ) -> tuple[PackedWeight, torch.Tensor | None] | None:
    """bfloat16 gate/up weights whose halves are whole 16-column panels go to the C GEMM with SiLU-and-mul in its
    epilogue. At 64 decode rows of SmolLM2-135M this saves the separate SiLU and multiply passes and the 3072-wide
    intermediate (about 1.3 ms of a 45 ms step); results equal the unfused C GEMM and ``silu_and_mul``."""
    if (weight.dtype is not torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2
            or weight.shape[0] % 32 != 0 or weight.shape[1] == 0 or weight.stride(1) != 1
            or (bias is not None and (bias.dtype is not torch.bfloat16 or bias.shape != weight.shape[:1]))):
        return None
    lib = native.kernels()
    if lib is None or not lib.has_gemm_bf16:
        return None
    panels = lib.pack_bf16_panels(_interleave_gate_up(weight).contiguous())
    fused_bias = None if bias is None else _interleave_gate_up(bias).contiguous()
    return packed(panels, PackedFormat.GATED_BF16_PANELS, weight), fused_bias


def gated_linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
    if not (isinstance(weight, PackedWeight) and weight.format is PackedFormat.GATED_BF16_PANELS):
        return silu_and_mul(linear(x, weight, bias))  # a plain weight (as the contract allows): the unfused ops
    n, k = weight.shape
    rows = _panel_rows(x, k, "gated_linear")
    lib = native.kernels()
    assert lib is not None  # the weight was packed by it
    out = lib.gemm_bf16_silu(rows, weight.data, n, bias)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n // 2)


def _lora_ok(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor,
             ranks: torch.Tensor | None) -> bool:
    """What the C kernel reads: one float32 or bfloat16 dtype, rows with unit column stride, contiguous slots."""
    if x.dtype not in (torch.float32, torch.bfloat16) or not (x.dtype == y.dtype == a.dtype == b.dtype):
        return False
    if x.dim() != 2 or y.dim() != 2 or a.dim() != 3 or b.dim() != 3 or x.shape[0] != y.shape[0]:
        return False
    if a.shape[0] != b.shape[0] or a.shape[1] != b.shape[1] or a.shape[2] != x.shape[1] or b.shape[2] != y.shape[1]:
        return False
    if ranks is not None and (ranks.dtype != torch.int32 or not ranks.is_contiguous() or ranks.shape != (a.shape[0],)
                              or not ranks.is_cpu):
        return False
    return (x.is_cpu and y.is_cpu and (x.stride(1) == 1 or x.shape[1] == 1) and (y.stride(1) == 1 or y.shape[1] == 1)
            and a.is_contiguous() and b.is_contiguous() and token_slots.dtype == torch.int64
            and token_slots.is_contiguous() and token_slots.shape == (x.shape[0],))


LORA_NATIVE_ENV = "LLMCTL_CPU_LORA_NATIVE"  # 0: lora_shrink_expand on the torch reference (for A/B measurements)
lora_native = native.env_on(LORA_NATIVE_ENV)


def lora_shrink_expand(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       token_slots: torch.Tensor, active_slots: tuple[int, ...],
                       ranks: torch.Tensor | None = None) -> None:
    """One C call per projection instead of two matmuls and an index_add per adapter, reading only each slot's
    real rank of the padded slots. Rows are taken from ``token_slots`` directly: ``active_slots`` only has to
    cover them, as the runner's does."""
    lib = native.kernels() if lora_native else None
    if lib is None or not _lora_ok(x, y, a, b, token_slots, ranks):
        reference.lora_shrink_expand(x, y, a, b, token_slots, active_slots, ranks)
        return
    if ranks is None:
        ranks = torch.full((a.shape[0],), a.shape[1], dtype=torch.int32)
    lib.lora_shrink_expand(x, y, a, b, token_slots, ranks)


def op_overrides() -> list[OpOverride]:
    return [OpOverride(name, fn, platform="cpu", priority=10)
            for name, fn in (("rms_norm", rms_norm), ("fused_add_rms_norm", fused_add_rms_norm),
                             ("silu_and_mul", silu_and_mul), ("rotary_embedding", rotary_embedding),
                             ("greedy_sample", greedy_sample), ("sampled_logprobs", sampled_logprobs),
                             ("sample_softmax", sample_softmax),
                             ("pack_linear_weight", pack_linear_weight),
                             ("linear", linear), ("pack_gated_linear_weight", pack_gated_linear_weight),
                             ("gated_linear", gated_linear), ("lora_shrink_expand", lora_shrink_expand),
                             ("pack_fused_moe_weights", moe.pack_fused_moe_weights), ("fused_moe", moe.fused_moe))]
