"""Reference paged attention: the oracle every backend's kernels are tested against.

Layout: one tensor per layer, ``[2, num_blocks, block_size, num_kv_heads, head_size]``. Clarity over speed:
one sequence at a time, scores in float32. An 8-bit cache (``llmctl.kv.cache_dtype``) has ``head_size + 4`` in the
last dimension: each head's codes and its float32 scale; writing quantizes, reading dequantizes to float32.
"""

from __future__ import annotations

import torch

from llmctl.attention import AttentionMetadata
from llmctl.kv.cache_dtype import dequantize_rows, is_quantized_kv, pack_rows
from llmctl.layers.encoder_attention import check_whole_sequences


def write_kv_reference(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    block_size = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    if is_quantized_kv(kv_cache.dtype):
        kv_cache[0, blocks, offsets] = pack_rows(key[keep], kv_cache.dtype)
        kv_cache[1, blocks, offsets] = pack_rows(value[keep], kv_cache.dtype)
        return
    kv_cache[0, blocks, offsets] = key[keep].to(kv_cache.dtype)
    kv_cache[1, blocks, offsets] = value[keep].to(kv_cache.dtype)


def gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``seq_len`` keys and values of one sequence, as [seq_len, num_kv_heads, head_size] (float32,
    dequantized, from an 8-bit cache)."""
    block_size = kv_cache.shape[2]
    n_blocks = (seq_len + block_size - 1) // block_size
    ids = block_table[:n_blocks].long()
    k = kv_cache[0, ids].reshape(-1, *kv_cache.shape[3:])[:seq_len]
    v = kv_cache[1, ids].reshape(-1, *kv_cache.shape[3:])[:seq_len]
    if is_quantized_kv(kv_cache.dtype):
        return dequantize_rows(k), dequantize_rows(v)
    return k, v


def attention_for_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sliding_window: int | None,
    causal: bool = True, *, logits_soft_cap: float | None = None, alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the last ``len(q)`` positions over ``k``/``v`` holding the whole context
    (``causal=False``: every query sees every key, for encoders).

    ``logits_soft_cap`` squashes the scaled scores as ``cap * tanh(s / cap)`` (Gemma 2); ``alibi_slopes``
    ([num_heads] float) adds ``slope * (key_pos - query_pos)`` to each head's scores (BLOOM, MPT): the same
    softmax as the reference libraries' ``slope * key_pos``, which differs per row by a constant only."""
    q_len, n_heads, _ = q.shape
    kv_len, n_kv, _ = k.shape
    group = n_heads // n_kv
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if logits_soft_cap is not None:
        scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
    q_pos = torch.arange(kv_len - q_len, kv_len).unsqueeze(1)
    k_pos = torch.arange(kv_len).unsqueeze(0)
    if alibi_slopes is not None:
        distance = (k_pos - q_pos).to(scores.device, torch.float32)
        scores = scores + alibi_slopes.float().to(scores.device)[:, None, None] * distance
    allowed = k_pos <= q_pos if causal else torch.ones(q_len, kv_len, dtype=torch.bool)
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def paged_attention_reference(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    causal: bool = True,
    *,
    logits_soft_cap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """``causal=False`` (bidirectional, the ``bidirectional`` feature) needs every sequence's whole context in
    this step, which it checks: a partial one would miss the keys of its later tokens."""
    if not causal:
        check_whole_sequences(metadata)
    if out is None:
        out = torch.zeros_like(query)
    qsl = metadata.query_start_loc.tolist()
    seq_lens = metadata.seq_lens.tolist()
    for i in range(metadata.num_seqs):
        start, end = qsl[i], qsl[i + 1]
        if end == start:
            continue
        k, v = gather_context(kv_cache, metadata.block_tables[i], seq_lens[i])
        out[start:end] = attention_for_sequence(query[start:end], k, v, scale, sliding_window, causal,
                                                 logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes)
    return out
