"""Multi-LoRA shrink and expand by adapter slot: ``y[t] += B[s] @ (A[s] @ x[t])`` with ``s = token_slots[t]``.

Two kernels, as punica splits them: the shrink writes each row's ``[max_rank]`` vector (float32 scratch), the
expand adds ``h @ B[s]`` to a block of output columns per program (B stored transposed, ``[slots, max_rank,
out]``, so a block's loads run along the outputs). Each slot's real rank (``ranks``) masks the
padded part of the stored slots, so a rank-8 adapter in rank-64 slots reads an eighth of them, and a row of the
base model (slot -1) or of a slot whose adapter does not target this projection (rank 0) writes nothing. The
shrunk vector and the delta are rounded to the dtype where the torch reference rounds them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_triton._common import check_device, next_pow2


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, ranks_ptr, h_ptr, stride_x, in_features, max_rank,
                   R_PAD: tl.constexpr, BLOCK_K: tl.constexpr, ROUND_TO: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row)
    rank = tl.where(slot >= 0, tl.load(ranks_ptr + tl.maximum(slot, 0)), 0)
    js = tl.arange(0, R_PAD)
    j_ok = js < rank
    base = tl.maximum(slot, 0).to(tl.int64) * max_rank * in_features
    acc = tl.zeros((R_PAD,), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < in_features
        x = tl.load(x_ptr + row * stride_x + ks, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + base + js[:, None] * in_features + ks[None, :], mask=j_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    acc = acc.to(ROUND_TO).to(tl.float32)  # the reference's first matmul returns the dtype
    tl.store(h_ptr + row * R_PAD + js, acc)


@triton.jit
def _expand_kernel(y_ptr, b_ptr, slots_ptr, ranks_ptr, h_ptr, stride_y, out_features, max_rank,
                   R_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slots_ptr + row)
    rank = tl.where(slot >= 0, tl.load(ranks_ptr + tl.maximum(slot, 0)), 0)
    js = tl.arange(0, R_PAD)
    j_ok = js < rank
    n_ok = cols < tl.where(rank > 0, out_features, 0)  # rank 0 (or a base row): write nothing
    h = tl.load(h_ptr + row * R_PAD + js, mask=j_ok, other=0.0)
    base = tl.maximum(slot, 0).to(tl.int64) * max_rank * out_features
    b = tl.load(b_ptr + base + js[:, None].to(tl.int64) * out_features + cols[None, :],
                mask=j_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)  # B transposed: rows along outputs
    delta = tl.sum(b * h[:, None], axis=0).to(y_ptr.dtype.element_ty).to(tl.float32)
    y = tl.load(y_ptr + row * stride_y + cols, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (y + delta).to(y_ptr.dtype.element_ty), mask=n_ok)


def lora_shrink_expand(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       token_slots: torch.Tensor, active_slots: tuple[int, ...],
                       ranks: torch.Tensor | None = None) -> None:
    """Same signature and contract as the reference: ``y`` (a column view is fine) gets the adapters' deltas in
    place; ``active_slots`` is not needed, the slots are read per row on the device."""
    check_device(x, y, a, b)
    rows = x.shape[0]
    if rows == 0:
        return
    num_slots, max_rank, in_features = a.shape
    out_features = b.shape[2]
    if ranks is None:
        ranks = torch.full((num_slots,), max_rank, dtype=torch.int32, device=a.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    a, b = a.contiguous(), b.contiguous()
    slots = token_slots.to(device=x.device, dtype=torch.int64).contiguous()
    r_pad = next_pow2(max_rank)
    h = torch.empty((rows, r_pad), dtype=torch.float32, device=x.device)
    round_to = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[y.dtype]
    _shrink_kernel[(rows,)](x, a, slots, ranks, h, x.stride(0), in_features, max_rank, R_PAD=r_pad,
                            BLOCK_K=min(128, next_pow2(in_features)), ROUND_TO=round_to)
    if y.stride(-1) != 1:
        raise ValueError("lora_shrink_expand: y needs unit stride along its columns")
    block_n = min(128, next_pow2(out_features))
    _expand_kernel[(rows, triton.cdiv(out_features, block_n))](y, b, slots, ranks, h, y.stride(0), out_features,
                                                               max_rank, R_PAD=r_pad, BLOCK_N=block_n)
