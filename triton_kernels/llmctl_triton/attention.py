"""Paged attention over core's flattened mixed batch, in Triton.

Two paths share the same masking rules as the torch oracle (:mod:`llmctl.ops.paged_attention`):

* ``_paged_attn_kernel`` handles any mix of prefill chunks (with or without a cached prefix) and decodes. One
  program owns a tile of ``BLOCK_M`` rows = several query tokens x all query heads that share one KV head
  (GQA packing, so a decode with 8 query heads per KV head still fills a tensor-core tile), and streams that
  KV head's context through an online softmax, ``TILE_N`` keys at a time, gathering keys from pages via the
  block table.
* For all-decode batches with long contexts and too few (sequence, KV head) pairs to fill the GPU, the
  split-K (flash-decoding) path cuts each context into partitions processed by separate programs, writes a
  partial output and log-sum-exp per partition, and a reduce kernel merges them.

An 8-bit cache (``llmctl_triton.kv8``) is read as codes plus a float32 scale per row: keys are dequantized in
registers and their scales applied to the scores, value scales are folded into the probabilities.

Partition boundaries depend only on each sequence's own length, so a sequence's result on one path does not
depend on what else is in the batch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from llmctl.attention import AttentionMetadata

from llmctl_triton._common import check_device, interpreting, next_pow2, num_sms, upcast_for_dot
from llmctl_triton.kv8 import SCALE_BYTES, cache_format, code_and_scale_views, code_to_f32

LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30  # a window larger than any context: the window mask is then always true
MAX_SPLITS = 64
DEFAULT_PARTITION = 512


@triton.jit
def _key_scores(q, kt, k_scale_ptrs, k_ok, scale_log2, KV_FMT: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """Q.K^T in log2 units for one key tile; 8-bit codes are dequantized in registers and each key's scale is
    applied to its score. Shared by the single-pass and the split-K kernels."""
    if KV_FMT != 0:
        s = tl.dot(q, code_to_f32(kt, KV_FMT), input_precision=DOT_PREC)
        ksc = tl.load(k_scale_ptrs, mask=k_ok, other=0.0)
        s = s * ksc[None, :] * scale_log2
    else:
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * scale_log2
    return s


@triton.jit
def _weighted_values(p, v, v_scale_ptrs, k_ok, KV_FMT: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    """P.V for one value tile; with 8-bit codes each value row's scale is folded into its probabilities."""
    if KV_FMT != 0:
        vsc = tl.load(v_scale_ptrs, mask=k_ok, other=0.0)
        pv = tl.dot(p * vsc[None, :], code_to_f32(v, KV_FMT), input_precision=DOT_PREC)
    else:
        if UPCAST:
            v = v.to(tl.float32)
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return pv


@triton.jit
def _paged_attn_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    qsl_ptr, seq_lens_ptr, bt_ptr,
    scale_log2, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    k_scale_ptr, v_scale_ptr, stride_kwb, stride_kws, stride_kwh, stride_vwb, stride_vws, stride_vwh,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    HEAD: tl.constexpr, HEAD_P2: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, KV_FMT: tl.constexpr,
):
    seq = tl.program_id(0)
    qblk = tl.program_id(1)
    kvh = tl.program_id(2)
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_P2
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if qblk * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # keys before the first query row: prefix-cache hits and earlier chunks

    rows = tl.arange(0, BLOCK_M)
    tok = qblk * BLOCK_Q + rows // GROUP_P2
    hh = rows % GROUP_P2
    head = kvh * GROUP + hh
    row_ok = (tok < q_len) & (hh < GROUP)
    d = tl.arange(0, HEAD_P2)
    d_ok = d < HEAD  # head sizes like 80/96 are padded to a power of two and masked
    tok64 = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST or KV_FMT != 0:
        q = q.to(tl.float32)
    q_pos = ctx_len + tok

    # Keys this tile can see: up to its last query row (causal), from its first row's window start.
    hi = ctx_len + tl.minimum(q_len, (qblk + 1) * BLOCK_Q)
    lo = tl.maximum(ctx_len + qblk * BLOCK_Q - window + 1, 0)
    lo = (lo // TILE_N) * TILE_N  # tile-aligned so every batch composition visits keys in the same order

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_P2], tl.float32)
    n_off = tl.arange(0, TILE_N)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, TILE_N):
        kpos = start + n_off
        k_ok = kpos < hi
        blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        slot = kpos % BLOCK_SIZE
        kt = tl.load(k_cache_ptr + blk[None, :] * stride_kb + slot[None, :] * stride_ks + kvh * stride_kh
                     + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0)
        s = _key_scores(q, kt, k_scale_ptr + blk * stride_kwb + slot * stride_kws + kvh * stride_kwh + HEAD // 4,
                        k_ok, scale_log2, KV_FMT, UPCAST, DOT_PREC)
        allowed = (kpos[None, :] <= q_pos[:, None]) & (kpos[None, :] > q_pos[:, None] - window) & k_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh
                    + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0)
        acc = acc * alpha[:, None] + _weighted_values(
            p, v, v_scale_ptr + blk * stride_vwb + slot * stride_vws + kvh * stride_vwh + HEAD // 4, k_ok, KV_FMT,
            UPCAST, DOT_PREC)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + tok64[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _paged_decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, part_out_ptr, part_lse_ptr,
    qsl_ptr, seq_lens_ptr, bt_ptr,
    scale_log2, window, partition, max_splits,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h,
    k_scale_ptr, v_scale_ptr, stride_kwb, stride_kws, stride_kwh, stride_vwb, stride_vws, stride_vwh,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr,
    HEAD: tl.constexpr, HEAD_P2: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, KV_FMT: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if q_len == 0:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    q_pos = seq_len - 1  # the decode token is the sequence's last position

    rows = tl.arange(0, BLOCK_M)
    head = kvh * GROUP + rows
    row_ok = rows < GROUP
    d = tl.arange(0, HEAD_P2)
    d_ok = d < HEAD
    tok64 = (q_start + q_len - 1).to(tl.int64)
    q = tl.load(q_ptr + tok64 * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST or KV_FMT != 0:
        q = q.to(tl.float32)

    lo = tl.maximum(q_pos - window + 1, 0)
    lo = (lo // TILE_N) * TILE_N
    span = seq_len - lo
    # Partition length is a function of this sequence alone (at least `partition`, and few enough pieces to fit
    # in `max_splits`), which keeps results independent of the rest of the batch.
    split_len = tl.maximum(partition, tl.cdiv(tl.cdiv(span, max_splits), TILE_N) * TILE_N)
    s_lo = lo + split * split_len
    s_hi = tl.minimum(s_lo + split_len, seq_len)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_P2], tl.float32)
    n_off = tl.arange(0, TILE_N)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    for start in range(s_lo, s_hi, TILE_N):
        kpos = start + n_off
        k_ok = kpos < s_hi
        blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        slot = kpos % BLOCK_SIZE
        kt = tl.load(k_cache_ptr + blk[None, :] * stride_kb + slot[None, :] * stride_ks + kvh * stride_kh
                     + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0)
        s = _key_scores(q, kt, k_scale_ptr + blk * stride_kwb + slot * stride_kws + kvh * stride_kwh + HEAD // 4,
                        k_ok, scale_log2, KV_FMT, UPCAST, DOT_PREC)
        allowed = k_ok & (kpos > q_pos - window)
        s = tl.where(allowed[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh
                    + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0)
        acc = acc * alpha[:, None] + _weighted_values(
            p, v, v_scale_ptr + blk * stride_vwb + slot * stride_vws + kvh * stride_vwh + HEAD // 4, k_ok, KV_FMT,
            UPCAST, DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))  # log2 units
    seq64 = seq.to(tl.int64)
    po = part_out_ptr + seq64 * stride_po_s + head[:, None] * stride_po_h + split * stride_po_p + d[None, :]
    tl.store(po, out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + seq64 * stride_pl_s + head * stride_pl_h + split, lse, mask=row_ok)


@triton.jit
def _split_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, qsl_ptr, num_splits,
    stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h, stride_ot, stride_oh,
    HEAD: tl.constexpr, HEAD_P2: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if q_len == 0:
        return
    sp = tl.arange(0, SPLITS_P2)
    sp_ok = sp < num_splits
    d = tl.arange(0, HEAD_P2)
    d_ok = d < HEAD
    seq64 = seq.to(tl.int64)
    lse = tl.load(part_lse_ptr + seq64 * stride_pl_s + head * stride_pl_h + sp, mask=sp_ok, other=float("-inf"))
    # Finite whenever the sequence has keys (its first partition holds the decode token's own key); -inf only for
    # an empty sequence, i.e. a padded row of a captured graph, which must come out as zeros rather than NaN.
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(part_out_ptr + seq64 * stride_po_s + head * stride_po_h + sp[:, None] * stride_po_p + d[None, :],
                mask=sp_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tok64 = (q_start + q_len - 1).to(tl.int64)
    tl.store(out_ptr + tok64 * stride_ot + head * stride_oh + d, res.to(out_ptr.dtype.element_ty), mask=d_ok)


def use_split_k(metadata: AttentionMetadata, num_kv_heads: int, device: torch.device,
                partition_size: int = DEFAULT_PARTITION) -> bool:
    """Split-K pays off only for decode-only steps whose contexts span several partitions and whose
    (sequence, KV head) programs are too few to occupy every SM; otherwise its extra pass is pure cost."""
    if metadata.max_query_len != 1 or metadata.max_seq_len < 2 * partition_size:
        return False
    return metadata.num_seqs * num_kv_heads < 2 * num_sms(device)


def _tile_n(head_p2: int) -> int:
    if interpreting():
        return 32  # fewer, larger numpy steps; the interpreter's cost is per loop iteration
    return 64 if head_p2 <= 128 else 32


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    *,
    split_k: bool | None = None,
    partition_size: int = DEFAULT_PARTITION,
) -> torch.Tensor:
    """Drop-in for :func:`llmctl.ops.paged_attention.paged_attention_reference`.

    ``split_k`` forces (True) or forbids (False) the flash-decoding path; ``None`` lets :func:`use_split_k`
    decide. Forcing it on a batch with a prefill chunk is an error, since split-K handles one query per sequence.
    """
    check_device(query, kv_cache)
    if out is None:
        out = torch.empty_like(query)
    if metadata.num_seqs == 0:
        out.zero_()
        return out
    if out.shape[0] > metadata.num_tokens:
        out[metadata.num_tokens:].zero_()  # padding rows: the reference leaves them zero too
    if query.stride(-1) != 1:
        query = query.contiguous()
    if kv_cache.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("kv_cache and out need a contiguous head dimension")
    num_heads, head = query.shape[1], query.shape[2]
    _, _, block_size, num_kv_heads, kv_head = kv_cache.shape
    fmt = cache_format(kv_cache)
    if fmt:  # 8-bit: codes as bytes, each row's scale as a float32 word after them (llmctl_triton.kv8)
        kv_head -= SCALE_BYTES
    if kv_head != head or num_heads % num_kv_heads:
        raise ValueError(f"query heads {num_heads}x{head} do not fit KV heads {num_kv_heads}x{kv_head}")
    group = num_heads // num_kv_heads
    group_p2, head_p2 = next_pow2(group), max(16, next_pow2(head))
    window = NO_WINDOW if not sliding_window else int(sliding_window)
    tile_n = _tile_n(head_p2)
    kc, vc = kv_cache[0], kv_cache[1]
    kw, vw, w_strides = kc, vc, (0,) * 6  # scales: unused unless 8-bit
    if fmt:
        (kc, kw), (vc, vw) = code_and_scale_views(kc), code_and_scale_views(vc)
        w_strides = (kw.stride(0), kw.stride(1), kw.stride(2), vw.stride(0), vw.stride(1), vw.stride(2))
    qsl = metadata.query_start_loc
    seq_lens = metadata.seq_lens
    bt = metadata.block_tables if metadata.block_tables.stride(-1) == 1 else metadata.block_tables.contiguous()
    upcast = upcast_for_dot(query.dtype)
    prec = "ieee" if query.dtype == torch.float32 else "tf32"
    scale_log2 = float(scale) * LOG2E

    if split_k is None:
        split_k = use_split_k(metadata, num_kv_heads, query.device, partition_size)
    elif split_k and metadata.max_query_len != 1:
        raise ValueError("split-K attention handles decode-only batches (max_query_len == 1)")

    if split_k:
        partition = max(tile_n, math.ceil(partition_size / tile_n) * tile_n)
        splits = max(1, min(MAX_SPLITS, math.ceil(metadata.max_seq_len / partition)))
        block_m = max(16, group_p2)
        part_out = torch.empty((metadata.num_seqs, num_heads, splits, head_p2), dtype=torch.float32,
                               device=query.device)
        part_lse = torch.empty((metadata.num_seqs, num_heads, splits), dtype=torch.float32, device=query.device)
        _paged_decode_split_kernel[(metadata.num_seqs, num_kv_heads, splits)](
            query, kc, vc, part_out, part_lse, qsl, seq_lens, bt,
            scale_log2, window, partition, MAX_SPLITS,
            query.stride(0), query.stride(1),
            kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
            bt.stride(0), part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1), kw, vw, *w_strides,
            BLOCK_SIZE=block_size, GROUP=group, HEAD=head, HEAD_P2=head_p2, BLOCK_M=block_m, TILE_N=tile_n,
            UPCAST=upcast, DOT_PREC=prec, KV_FMT=fmt,
        )
        _split_reduce_kernel[(metadata.num_seqs, num_heads)](
            part_out, part_lse, out, qsl, splits,
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD=head, HEAD_P2=head_p2, SPLITS_P2=next_pow2(splits),
        )
        return out

    if metadata.max_query_len <= 1:
        block_m = max(16, group_p2)
    elif interpreting():
        block_m = max(16, group_p2, min(64, next_pow2(metadata.max_query_len) * group_p2))
    else:
        block_m = max(64 if head_p2 <= 128 else 32, group_p2)
    block_q = block_m // group_p2
    grid = (metadata.num_seqs, triton.cdiv(max(metadata.max_query_len, 1), block_q), num_kv_heads)
    _paged_attn_kernel[grid](
        query, kc, vc, out, qsl, seq_lens, bt,
        scale_log2, window,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        bt.stride(0), kw, vw, *w_strides,
        BLOCK_SIZE=block_size, GROUP=group, GROUP_P2=group_p2, HEAD=head, HEAD_P2=head_p2,
        BLOCK_M=block_m, TILE_N=tile_n, UPCAST=upcast, DOT_PREC=prec, KV_FMT=fmt,
    )
    return out
