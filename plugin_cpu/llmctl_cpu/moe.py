"""The CPU's ``fused_moe``: a MoE layer's experts in one C call (``native/kernels/moe.c``) on weights packed at load.

Why: the torch reference runs a dozen torch ops per expert per layer (a mask, a gather, two GEMMs, the activation,
an index_add), which at decode batch sizes costs more in dispatch than the experts' arithmetic. The C kernel sorts the
routing once, runs each expert's gate/up GEMM (SiLU-and-mul in its epilogue) and down GEMM over that expert's rows
only, and sums each token's weighted rows in the reference's order. ``LLMCTL_CPU_MOE_NATIVE=0`` keeps the reference
(read when a layer is packed, for A/B measurements).
"""

from __future__ import annotations

import torch
from llmctl.ops import reference

from llmctl_cpu import native
from llmctl_cpu.packed_weight import PackedExperts

MOE_NATIVE_ENV = "LLMCTL_CPU_MOE_NATIVE"
MAX_TOP_K = 64  # the kernel's per-token slot buffer (moe.c: MOE_MAX_TOPK)
# Long prefills run in pieces of this many tokens, so the kernel's scratch (each routed row's intermediate and
# down-projected copy) stays bounded; a token's result does not depend on its piece.
CHUNK_TOKENS = 512
_SILU = ("silu", "swish")


def _panels(w: torch.Tensor) -> torch.Tensor:
    """[E, n, k] -> [E, ceil(n / 16), k, 16]: 16-column panels with k contiguous, zero rows past n."""
    e, n, k = w.shape
    pad = -n % 16
    if pad:
        w = torch.cat((w, w.new_zeros(e, pad, k)), dim=1)
    return w.reshape(e, -1, 16, k).transpose(2, 3).contiguous()


def _interleave_gate_up(w13: torch.Tensor) -> torch.Tensor:
    """[E, 2I, H] gate rows then up rows -> 16 gate rows, their 16 up rows, the next 16 gate rows, ..."""
    e, two_i, h = w13.shape
    i = two_i // 2
    gate, up = w13[:, :i].reshape(e, i // 16, 16, h), w13[:, i:].reshape(e, i // 16, 16, h)
    return torch.stack((gate, up), dim=2).reshape(e, two_i, h)


def pack_fused_moe_weights(w13: torch.Tensor, w2: torch.Tensor, activation: str = "silu"
                           ) -> tuple[PackedExperts, PackedExperts] | None:
    """Panels for the C kernel where it runs this layer (float32 or bf16 experts, SiLU, an intermediate size
    that is whole 16-column panels); otherwise ``None`` and the reference runs the plain weights."""
    if not native.env_on(MOE_NATIVE_ENV) or activation not in _SILU:
        return None
    if w13.dim() != 3 or w2.dim() != 3 or w13.device.type != "cpu" or w13.dtype not in (torch.float32, torch.bfloat16):
        return None
    e, two_i, h = w13.shape
    if w2.shape != (e, h, two_i // 2) or w2.dtype != w13.dtype or two_i % 32 != 0 or h == 0 or w2.device != w13.device:
        return None
    lib = native.kernels()
    if lib is None or not lib.has_fused_moe:
        return None
    return (PackedExperts(_panels(_interleave_gate_up(w13)), e, two_i, h),
            PackedExperts(_panels(w2), e, h, two_i // 2))


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor | PackedExperts, w2: torch.Tensor | PackedExperts,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The C kernel on packed experts; plain weights (the contract lets core pass them) go to the reference."""
    if not isinstance(w13, PackedExperts) or not isinstance(w2, PackedExperts):
        return reference.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation)
    e, two_i, h = w13.shape
    if activation not in _SILU:
        raise ValueError(f"fused_moe: the experts were packed for SiLU, not activation {activation!r}")
    if hidden.shape[-1] != h:
        raise ValueError(f"fused_moe: hidden has {hidden.shape[-1]} features, the experts expect {h}")
    if hidden.dtype != w13.dtype:
        raise TypeError(f"fused_moe: hidden is {hidden.dtype}, the packed experts are {w13.dtype}")
    rows = hidden.reshape(-1, h)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != rows.shape[0]:
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [{rows.shape[0]}, top_k]")
    if topk_ids.shape[1] > MAX_TOP_K:
        raise ValueError(f"fused_moe: top_k = {topk_ids.shape[1]} is over this kernel's limit of {MAX_TOP_K}")
    lib = native.kernels()
    assert lib is not None  # the experts were packed by it
    ids = topk_ids.to(torch.int64).contiguous()
    weights = topk_weights.float().contiguous()
    if rows.shape[0] <= CHUNK_TOKENS:
        return lib.fused_moe(rows, w13.data, w2.data, ids, weights, e, two_i // 2).view(hidden.shape)
    out = torch.empty(rows.shape, dtype=rows.dtype)
    for lo in range(0, rows.shape[0], CHUNK_TOKENS):
        hi = lo + CHUNK_TOKENS
        out[lo:hi] = lib.fused_moe(rows[lo:hi], w13.data, w2.data, ids[lo:hi], weights[lo:hi], e, two_i // 2)
    return out.view(hidden.shape)
