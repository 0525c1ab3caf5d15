"""``cpu-sdpa``: paged attention for the whole flattened batch in a handful of batched fp32 GEMMs.

Why not ``torch.nn.functional.scaled_dot_product_attention``: its CPU flash kernel picks its query/key split
sizes from the padded lengths, so a sequence's result changes (in the last bits) with the length of the longest
sequence it is batched with. Core requires batch invariance, so this backend does the math itself, shaped so
that every value a sequence gets is produced by an operation whose shape depends only on that sequence:

* Scores are one batched GEMM ``[.., M, D] x [.., D, S_pad]``. Measured on oneDNN/MKL fp32: a row's result does
  not depend on the batch count or on ``S_pad`` (the N dimension), nor on M once M >= 8; tiny M takes a
  different kernel. Decodes therefore always run as their own group with M = query heads per KV head, and
  prefill rows are padded to at least ``MIN_PREFILL_ROWS`` rows per KV head.
* Softmax runs over padded keys masked to ``-inf``; their ``exp`` is exactly 0, and torch's row softmax
  accumulates lanes in index order, so trailing zeros do not move a bit.
* ``P @ V`` reduces over keys, and a GEMM's K-blocking does depend on K. Keys are therefore cut into fixed
  chunks of ``KEY_CHUNK``; each chunk is a GEMM of fixed shape and the chunk results are added in order.
  Chunks past a sequence's end contribute exact zeros: their probabilities are 0 and their V rows are copies of
  a real (finite) row, so stale NaNs in unused cache slots cannot leak through ``0 * NaN``.

All math is float32 whatever the cache dtype: the reference is float32 too, and at decode the GEMMs are a minor
cost next to gathering the cache, so bf16 GEMMs would buy little and cost accuracy (torch's CPU bf16 matmul
rounds the scores to bf16 before the softmax).
"""

from __future__ import annotations

import torch
from llmctl.attention import AttentionMetadata
from llmctl.plugins.types import AttentionBackend, Support

KEY_CHUNK = 128
MIN_PREFILL_ROWS = 16  # GEMM rows per KV head below which MKL's small-M kernels change a row's rounding
QUERY_TILE = 512  # longer prefill chunks are split so the score tensor of one sequence stays bounded
SCORE_BUDGET = 1 << 25  # float32 elements of one sub-batch's score tensor (128 MiB)

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FEATURES = frozenset({"sliding_window", "prefix_caching", "chunked_prefill"})


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


class CpuSdpaAttention(AttentionBackend):
    name = "cpu-sdpa"
    platform = "cpu"
    priority = 10

    def supports(self, dtype: torch.dtype, head_size: int, block_size: int, features: frozenset[str]) -> Support:
        if dtype not in _SUPPORTED_DTYPES:
            return Support(False, f"dtype {dtype} not supported (float32, bfloat16, float16 are)")
        if not 0 < head_size <= 256:
            return Support(False, f"head_size {head_size} not in 1..256")
        if block_size <= 0:
            return Support(False, f"block_size {block_size} must be positive")
        missing = set(features) - _FEATURES
        if missing:
            return Support(False, f"features not supported: {', '.join(sorted(missing))}")
        return Support(True)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        flat = kv_cache.view(2, -1, *kv_cache.shape[3:])
        slots = slot_mapping.long()
        n = slots.shape[0]
        key, value = key[:n], value[:n]
        if n and bool((slots < 0).any()):
            keep = slots >= 0
            slots, key, value = slots[keep], key[keep], value[keep]
        flat[0].index_copy_(0, slots, key.to(kv_cache.dtype))
        flat[1].index_copy_(0, slots, value.to(kv_cache.dtype))

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty_like(query)
        n = metadata.num_seqs
        if n == 0:
            return out
        qsl = metadata.query_start_loc[: n + 1].long()
        starts, q_lens = qsl[:-1], qsl[1:] - qsl[:-1]
        seq_lens = metadata.seq_lens[:n].long()
        tables = metadata.block_tables[:n]
        if metadata.max_query_len == 1 and bool((q_lens == 1).all()):
            # All-decode fast path: no grouping, no query padding; identical math to the decode group below.
            _attend(query, kv_cache, out, starts, q_lens, seq_lens, tables, 1, scale, sliding_window)
            return out
        decode = torch.nonzero(q_lens == 1).flatten()
        if decode.numel():
            _attend(query, kv_cache, out, starts[decode], q_lens[decode], seq_lens[decode], tables[decode], 1,
                    scale, sliding_window)
        prefill = torch.nonzero(q_lens > 1).flatten()
        if prefill.numel():
            starts, q_lens, seq_lens, seq_idx = _split_query_tiles(
                starts[prefill], q_lens[prefill], seq_lens[prefill], prefill)
            tables = tables[seq_idx]
            _attend_prefill(query, kv_cache, out, starts, q_lens, seq_lens, tables, scale, sliding_window)
        return out


def _split_query_tiles(starts: torch.Tensor, q_lens: torch.Tensor, seq_lens: torch.Tensor, seq_idx: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut query runs longer than ``QUERY_TILE`` into consecutive pseudo-sequences (same block table, shorter
    context), so memory stays bounded. The cut depends only on the sequence's own query length."""
    tiles = (q_lens + QUERY_TILE - 1) // QUERY_TILE
    if bool((tiles == 1).all()):
        return starts, q_lens, seq_lens, seq_idx
    owner = torch.repeat_interleave(torch.arange(len(tiles)), tiles)
    first = torch.cumsum(tiles, 0) - tiles
    t = torch.arange(len(owner)) - first[owner]
    lo = t * QUERY_TILE
    hi = torch.minimum(lo + QUERY_TILE, q_lens[owner])
    return starts[owner] + lo, hi - lo, seq_lens[owner] - q_lens[owner] + hi, seq_idx[owner]


def _attend_prefill(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, starts: torch.Tensor,
                    q_lens: torch.Tensor, seq_lens: torch.Tensor, tables: torch.Tensor, scale: float,
                    window: int | None) -> None:
    """Prefill rows in sub-batches of consecutive sequences, each under ``SCORE_BUDGET`` score elements."""
    heads, group = query.shape[1], query.shape[1] // kv_cache.shape[3]
    min_q = -(-MIN_PREFILL_ROWS // group)
    ql, sl = q_lens.tolist(), seq_lens.tolist()
    i = 0
    while i < len(ql):
        j, q_pad, s_pad = i, 0, 0
        while j < len(ql):
            nq, ns = max(q_pad, ql[j], min_q), max(s_pad, _ceil_to(sl[j], KEY_CHUNK))
            if j > i and (j - i + 1) * heads * nq * ns > SCORE_BUDGET:
                break
            q_pad, s_pad, j = nq, ns, j + 1
        _attend(query, kv_cache, out, starts[i:j], q_lens[i:j], seq_lens[i:j], tables[i:j], q_pad, scale, window)
        i = j


def _attend(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, starts: torch.Tensor,
            q_lens: torch.Tensor, seq_lens: torch.Tensor, tables: torch.Tensor, q_pad: int, scale: float,
            window: int | None) -> None:
    """Attention for ``len(starts)`` sequences whose queries are padded to ``q_pad`` rows."""
    b = starts.shape[0]
    _, _, block_size, kv_heads, head_size = kv_cache.shape
    heads = query.shape[1]
    group = heads // kv_heads
    s_pad = _ceil_to(int(seq_lens.max()), KEY_CHUNK)
    # Padding key positions read the sequence's last real slot: finite data whose probability is exactly 0, so
    # neither stale cache contents (possibly NaN) nor other sequences' blocks can reach the result.
    k_pos = torch.arange(s_pad)
    pos = torch.minimum(k_pos[None, :], seq_lens[:, None] - 1)
    slots = (tables.long().gather(1, pos // block_size) * block_size + pos % block_size).flatten()
    flat = kv_cache.view(2, -1, kv_heads, head_size)

    def gather(which: int) -> torch.Tensor:
        raw = flat[which].index_select(0, slots).view(b, s_pad, kv_heads, head_size)
        dst = torch.empty(b, kv_heads, s_pad, head_size, dtype=torch.float32)
        dst.copy_(raw.permute(0, 2, 1, 3))
        return dst

    k, v = gather(0), gather(1)

    j = torch.arange(q_pad)
    row = torch.minimum(j[None, :], q_lens[:, None] - 1)  # padding rows repeat the last real row
    q_pos = (seq_lens - q_lens)[:, None] + row  # absolute position of each query row, [b, q_pad]
    if q_pad == 1:
        src = starts
    else:
        src = (starts[:, None] + row).flatten()
    q = torch.empty(b, kv_heads, q_pad, group, head_size, dtype=torch.float32)
    q.copy_(query.index_select(0, src).view(b, q_pad, kv_heads, group, head_size).permute(0, 2, 1, 3, 4))
    m = q_pad * group

    scores = torch.matmul(q.view(b, kv_heads, m, head_size), k.transpose(-1, -2))
    scores.mul_(scale)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]
    if window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - window
    scores.view(b, kv_heads, q_pad, group, s_pad).masked_fill_(~allowed[:, None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)

    n_chunks = s_pad // KEY_CHUNK
    p = probs.view(b, kv_heads, m, n_chunks, KEY_CHUNK).transpose(2, 3).contiguous()
    parts = torch.matmul(p, v.view(b, kv_heads, n_chunks, KEY_CHUNK, head_size))  # [b, Hk, chunks, m, D]
    acc = parts[:, :, 0]
    if n_chunks > 1:
        acc = acc.clone()
        for c in range(1, n_chunks):
            acc += parts[:, :, c]

    res = acc.view(b, kv_heads, q_pad, group, head_size).permute(0, 2, 1, 3, 4).reshape(b * q_pad, heads, head_size)
    res = res.to(out.dtype)
    if q_pad == 1:
        out.index_copy_(0, starts, res)
        return
    valid = (j[None, :] < q_lens[:, None]).flatten()
    rows = (starts[:, None] + j[None, :]).flatten()[valid]
    out.index_copy_(0, rows, res[valid])
