"""A sparse MoE layer's experts as two grouped GEMMs over the routed rows sorted by expert.

The routing is aligned once on the device with torch: the (token, slot) pairs are sorted by expert (stable, so an
expert's rows stay in token order) and each expert's run is padded to a multiple of ``BLOCK_M`` (padding rows hold
the sentinel ``num_pairs``), so every ``BLOCK_M`` block of sorted rows belongs to one expert and a program
multiplies it by that expert's weights alone. The first kernel computes the gate and up columns of the same block
in two accumulators and writes ``silu(gate) * up``; the second multiplies by the expert's down weights and the
routing weight and writes each pair's row. The pairs are then summed per token in ascending expert order in the
hidden dtype, rounding where the torch reference rounds (gate and up, silu, the product, the down projection, its
weighting, each addition), so float32 stays within float32 rounding of the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_triton._common import check_device, next_pow2, upcast_for_dot

_ROUND = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _rounded(x, ROUND_TO: tl.constexpr, BF16: tl.constexpr):
    """``x`` rounded to the dtype (to nearest even) and back to float32. bf16 is rounded on the bits: Triton's
    interpreter truncates float32 -> bf16 casts, which would put the tests' rounding off by up to an ulp per step."""
    if BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    else:
        return x.to(ROUND_TO).to(tl.float32)


@triton.jit
def _gate_up_kernel(x_ptr, w13_ptr, sorted_ptr, expert_ptr, inter_ptr, num_pairs, top_k, hidden, inter,
                    stride_x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, ROUND_TO: tl.constexpr,
                    BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    if expert >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows)
        row_ok = pair < num_pairs
        tok = (pair // top_k).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < inter
        w_base = w13_ptr + expert * 2 * inter * hidden
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < hidden
            a = tl.load(x_ptr + tok[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            wg = tl.load(w_base + cols[None, :].to(tl.int64) * hidden + ks[:, None], mask=w_mask, other=0.0)
            wu = tl.load(w_base + (cols[None, :] + inter).to(tl.int64) * hidden + ks[:, None], mask=w_mask,
                         other=0.0)
            if UPCAST:
                a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
            acc_g = tl.dot(a, wg, acc_g, input_precision=DOT_PREC)
            acc_u = tl.dot(a, wu, acc_u, input_precision=DOT_PREC)
        g = _rounded(acc_g, ROUND_TO, BF16)
        u = _rounded(acc_u, ROUND_TO, BF16)
        s = _rounded(g / (1.0 + tl.exp(-g)), ROUND_TO, BF16)
        h = _rounded(s * u, ROUND_TO, BF16)  # exactly representable: the store's own cast cannot move it
        tl.store(inter_ptr + rows[:, None].to(tl.int64) * inter + cols[None, :], h.to(ROUND_TO),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(inter_ptr, w2_ptr, sorted_ptr, expert_ptr, weight_ptr, out_ptr, num_pairs, hidden, inter,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, ROUND_TO: tl.constexpr, BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    if expert >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows)
        row_ok = pair < num_pairs
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < hidden
        w_base = w2_ptr + expert * hidden * inter
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < inter
            a = tl.load(inter_ptr + rows[:, None].to(tl.int64) * inter + ks[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_base + cols[None, :].to(tl.int64) * inter + ks[:, None],
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
        rw = tl.load(weight_ptr + pair, mask=row_ok, other=0.0)
        d = _rounded(_rounded(acc, ROUND_TO, BF16) * rw[:, None], ROUND_TO, BF16)
        tl.store(out_ptr + pair[:, None].to(tl.int64) * hidden + cols[None, :], d.to(ROUND_TO),
                 mask=row_ok[:, None] & col_ok[None, :])


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted pair indices [blocks * block_m], padded with the pair count; each block's expert [blocks], -1
    past the last) for the upper bound of blocks, ``ceil(pairs / block_m) + experts``, so the grid needs no
    device-to-host read of the counts."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    pairs = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    if counts.numel() > num_experts:
        raise IndexError(f"fused_moe: topk_ids holds an expert >= the layer's {num_experts} experts")
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(pairs, device=flat.device) - (counts.cumsum(0) - counts)[expert_of]
    blocks = triton.cdiv(pairs, block_m) + num_experts
    sorted_ids = torch.full((blocks * block_m,), pairs, dtype=torch.int64, device=flat.device)
    sorted_ids[(ends - padded)[expert_of] + rank] = order
    starts = torch.arange(blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(ends, starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_ids, block_expert


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Same signature and contract as core's reference; SiLU only (any other activation runs the reference)."""
    if activation not in ("silu", "swish"):
        from llmctl.ops import reference

        return reference.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation)
    check_device(hidden, w13, w2)
    num_experts, two_i, h = w13.shape
    inter = two_i // 2
    if hidden.shape[-1] != h or w2.shape != (num_experts, h, inter):
        raise ValueError(f"fused_moe: hidden [.., {hidden.shape[-1]}], w13 {tuple(w13.shape)} and w2 "
                         f"{tuple(w2.shape)} do not pair as [E, 2I, H] / [E, H, I]")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2:
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [tokens, top_k]")
    x = hidden.reshape(-1, h)
    x = x if x.stride(-1) == 1 else x.contiguous()
    tokens, top_k = topk_ids.shape
    pairs = tokens * top_k
    out = torch.zeros_like(x)
    if pairs == 0:
        return out.view(hidden.shape)
    w13, w2 = w13.contiguous(), w2.contiguous()
    block_m = 16 if pairs <= 64 * num_experts else 64
    sorted_ids, block_expert = align_by_expert(topk_ids, num_experts, block_m)
    blocks = block_expert.numel()
    round_to = _ROUND[x.dtype]
    upcast = upcast_for_dot(x.dtype)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    inter_rows = torch.empty((blocks * block_m, inter), dtype=x.dtype, device=x.device)
    bn1, bk1 = min(64, max(16, next_pow2(inter))), min(64, max(16, next_pow2(h)))
    _gate_up_kernel[(blocks, triton.cdiv(inter, bn1))](
        x, w13, sorted_ids, block_expert, inter_rows, pairs, top_k, h, inter, x.stride(0),
        BLOCK_M=block_m, BLOCK_N=bn1, BLOCK_K=bk1, UPCAST=upcast, DOT_PREC=prec, ROUND_TO=round_to,
        BF16=x.dtype == torch.bfloat16)
    weighted = torch.empty((pairs, h), dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    bn2, bk2 = min(64, max(16, next_pow2(h))), min(64, max(16, next_pow2(inter)))
    _down_kernel[(blocks, triton.cdiv(h, bn2))](
        inter_rows, w2, sorted_ids, block_expert, weights, weighted, pairs, h, inter,
        BLOCK_M=block_m, BLOCK_N=bn2, BLOCK_K=bk2, UPCAST=upcast, DOT_PREC=prec, ROUND_TO=round_to,
        BF16=x.dtype == torch.bfloat16)
    # each token's rows in ascending expert order, one rounded addition each, as the reference's index_add_
    by_expert = torch.argsort(topk_ids, dim=1, stable=True)
    rows = weighted.view(tokens, top_k, h).gather(1, by_expert.unsqueeze(-1).expand(tokens, top_k, h))
    for j in range(top_k):
        out += rows[:, j]
    return out.view(hidden.shape)
