"""``cpu-sdpa``: paged attention for the CPU — C kernels for decodes, torch's flash kernel for prefills.

Decodes (one query token) go to ``llmctl_cpu.native`` when its kernels are built: one call per layer walks each
sequence's block table in place (no gather, no padding, no mask), one thread per (sequence, KV head) in a fixed
order, so a row's result depends on its own sequence only, in float32 as in bfloat16. bfloat16 prefill chunks
(head size 64 or 128, no sliding window) run there too, in query tiles of 16 rows with keys in vector lanes and
probabilities rounded to bf16 for P.V (bf16 dot products or AMX where the CPU has them, float32 FMAs on AVX2
hosts; faster than per-row decodes or torch's flash kernel on a long prompt: docs/performance.md), and a row's
bits still do not depend on the chunking (they do differ from a decode of the same position).
The KV write and rotary embedding also run there. Without a C compiler the torch paths below run instead; both
are tested.

The torch decode path: the kernel runs bfloat16/float16 natively (fp32 accumulation and softmax), so the cache is
never upcast. Batch invariance: the kernel's result for one batch element depends only on that element's data
and on the call's shapes (its query/key split sizes come from the padded lengths, and a GEMM's reduction
blocking from the key count). So every call is shaped by the sequence's *own* lengths, never by the rest of the
batch:

* Decodes are grouped by ``DECODE_BUCKET``: a decode over ``L`` keys is padded to a
  multiple of ``DECODE_BUCKET`` keys (masked out) and batched with the other decodes of that bucket, so a
  query row's result depends on ``L`` alone. The query heads that share a KV head become the query rows of one
  kernel head (``[B, Hk, group, D]``), so grouped-query attention needs no K/V repeat. K/V are gathered as whole
  blocks, planned once per step in ``AttentionMetadata.plan_cache`` and shared by every layer; masked key
  positions are made finite (blocks past the end repeat a written block, unwritten tails are zeroed), so
  uninitialised cache slots (possibly NaN) cannot reach the result. In float32 the kernel's result for a row
  also depends on how many rows share its call, so float32 decodes run one sequence per call.
* Prefill chunks are one kernel call per sequence. A chunk with no cached context attends over the new
  tokens' keys/values as core hands them over (``key``/``value``), or, when the caller does not pass them,
  over the same values read back from the cache; ``is_causal`` lets the kernel skip the masked upper half.
  A chunk with cached context gathers its context once and uses an explicit (bottom-right causal) mask.
  Grouped-query attention is a stride-0 view of K/V over the query heads of one KV head.
* Sliding windows: decodes and context chunks only read the keys inside the window; masks do the rest.

Soft-capped attention (Gemma 2's ``logits_soft_cap``): every query row, decode or prefill, runs in the C decode
kernel as a decode over its own prefix, the scaled scores squashed as ``tanh(s / cap) * cap`` before the softmax
(torch's SDPA has no hook for it); float16, 8-bit caches and hosts without the kernels take the torch reference.

8-bit KV caches (``kv_cache_dtype`` int8 / fp8_e4m3 / fp8_e5m2): every query row, decode or prefill, runs in the C
kernel of ``kernels/attention_kv8.c`` as a decode over its own prefix, reading the codes and their per-row scales in
place; so a token's bits are the same whether it was computed in a prefill, a later chunk, a prefix-cache hit or a
decode. The write quantizes in C with the torch reference's bytes. Without the C kernels, or for float16 queries,
the torch reference runs (``llmctl.ops.paged_attention``).

Bits do change between a chunked and an unchunked prefill of the same prompt (different kernel shapes), as
they did between a token computed as a decode and recomputed in a prefill after preemption; core's
engine-level guarantee (same greedy tokens alone and batched) is tested in tests/test_engine_scheduling.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from llmctl.attention import AttentionMetadata
from llmctl.kv.cache_dtype import KV_CACHE_FEATURES, is_quantized_kv
from llmctl.ops.paged_attention import paged_attention_reference, write_kv_reference
from llmctl.plugins.types import AttentionBackend, Support

from llmctl_cpu import native
from llmctl_cpu.bidirectional import bidirectional_attention

DECODE_BUCKET = 32  # decode key counts are padded to a multiple of this (a function of the sequence only)
QUERY_TILE = 512  # context chunks longer than this run in query tiles, so the explicit mask stays bounded
# Prefill chunks the tiled bf16 kernel does not take (float32, sliding windows, other head sizes) run as per-row
# decodes in the C kernel when their sequence is at most this long (faster than the flash kernel up to this length,
# measured with 9 heads of 64: docs/performance.md); longer ones use the flash kernel.
NATIVE_PREFILL_MAX_LEN = 2048

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FEATURES = frozenset({"sliding_window", "prefix_caching", "chunked_prefill", "bidirectional",
                       "logits_soft_cap"}) | KV_CACHE_FEATURES


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


class CpuSdpaAttention(AttentionBackend):
    name = "cpu-sdpa"
    platform = "cpu"
    priority = 10
    # All-decode steps read lengths and block tables in place (no host read of the step), and a length-0 row
    # gets a zero output; the platform's recorder (llmctl_cpu.graph) refuses steps that take the torch paths.
    supports_graph_capture = True

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
        n = slot_mapping.shape[0]
        key, value = key[:n], value[:n]
        lib = native.kernels()
        if is_quantized_kv(kv_cache.dtype):
            if lib is not None and _kv8_rows_ok(key, kv_cache) and _kv8_rows_ok(value, kv_cache):
                lib.write_kv8(key, value, kv_cache, slot_mapping.long().contiguous())
            else:
                write_kv_reference(key, value, kv_cache, slot_mapping)
            return
        if lib is not None and _native_rows_ok(key, kv_cache) and _native_rows_ok(value, kv_cache):
            lib.write_kv(key, value, kv_cache, slot_mapping.long().contiguous())
            return
        flat = kv_cache.view(2, -1, *kv_cache.shape[3:])
        slots = slot_mapping.long()
        if n and int(slots.max()) >= flat.shape[1]:  # checked first: index_copy_ would write a partial batch
            bad = int((slots >= flat.shape[1]).nonzero()[0, 0])
            raise IndexError(f"slot_mapping[{bad}] = {int(slots[bad])} is outside the KV cache's {flat.shape[1]} "
                             "slots")
        if n and bool((slots < 0).any()):
            keep = slots >= 0
            slots, key, value = slots[keep], key[keep], value[keep]
        flat[0].index_copy_(0, slots, key.to(kv_cache.dtype))
        flat[1].index_copy_(0, slots, value.to(kv_cache.dtype))

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None, out: torch.Tensor | None = None, *,
                key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                causal: bool = True, logits_soft_cap: float | None = None) -> torch.Tensor:
        """``key``/``value`` ([num_tokens, Hk, D], ``None`` when a caller leaves them out): this step's new
        keys/values, the ones just given to ``write_kv``. Only used to skip re-reading the cache for prefill chunks
        without cached context. ``causal=False``: encoders' bidirectional attention (llmctl_cpu.bidirectional).
        ``logits_soft_cap`` (Gemma 2): every row runs in the C kernel as a decode over its own prefix, which squashes
        the scaled scores before its softmax (torch's SDPA cannot); without the kernels, the torch reference."""
        if out is None:
            out = torch.empty_like(query)
        if logits_soft_cap:
            return _forward_capped(query, kv_cache, metadata, scale, sliding_window, out, float(logits_soft_cap),
                                   causal)
        if is_quantized_kv(kv_cache.dtype):
            return _forward_kv8(query, kv_cache, metadata, scale, sliding_window, out, causal)
        if not causal:
            return bidirectional_attention(query, kv_cache, metadata, scale, out, key, value)
        n = metadata.num_seqs
        if n == 0:
            return out
        plan = _plan(metadata, kv_cache.shape[2], sliding_window, query.dtype, kv_cache.shape[4])
        lib = native.kernels() if plan.native is not None else None
        use_native = lib is not None and _native_query_ok(query, out, kv_cache)
        if use_native:
            rows = plan.native
            if rows.rows.numel() and not lib.decode_attention(query, out, kv_cache, rows.block_tables, rows.tables,
                                                              rows.rows, rows.seq_lens, sliding_window, scale):
                raise RuntimeError("native attention failed: a block table entry is outside the KV cache, or "
                                   "scratch memory could not be allocated")
            if rows.tiled_chunks is not None and not lib.prefill_attention_bf16(query, out, kv_cache, rows.block_tables,
                                                                                rows.tiled_chunks, scale):
                raise RuntimeError("native prefill attention failed: a block table entry is outside the KV cache, "
                                   "or scratch memory could not be allocated")
        flat = kv_cache.view(2, -1, *kv_cache.shape[3:])
        tables = metadata.block_tables
        block_size = kv_cache.shape[2]
        for i, start, ql, sl in plan.long_prefills if use_native else plan.prefills:
            _prefill(query, flat, out, start, ql, sl, tables[i], block_size, scale, sliding_window,
                     key if key is not None and value is not None and start + ql <= key.shape[0] else None,
                     value)
        if not use_native:
            for group in plan.torch_decodes(tables, block_size, sliding_window, query.dtype):
                _decode_group(query, kv_cache, out, group, scale)
        return out


def _forward_capped(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                    window: int | None, out: torch.Tensor, cap: float, causal: bool) -> torch.Tensor:
    """Soft-capped attention: decodes and prefill rows alike as decodes over their prefix in the C kernel (a row's
    bits then do not depend on the chunking or the batch), or the torch reference where the kernel cannot run."""
    lib = native.kernels()
    if lib is None or not causal or is_quantized_kv(kv_cache.dtype) or not _native_query_ok(query, out, kv_cache):
        return paged_attention_reference(query, kv_cache, metadata, scale, window, out, causal=causal,
                                         logits_soft_cap=cap)
    rows = _prefix_rows(metadata, "cpu-sdpa-capped")
    if rows is not None and rows.rows.numel() and not lib.decode_attention(
            query, out, kv_cache, rows.block_tables, rows.tables, rows.rows, rows.seq_lens, window, scale,
            soft_cap=cap):
        raise RuntimeError("native attention failed: a block table entry is outside the KV cache, or scratch memory "
                           "could not be allocated")
    return out


def _prefix_rows(metadata: AttentionMetadata, key: str) -> _NativeRows | None:
    """Every query row of the step as a decode over its own prefix (None for an empty step), memoized per step."""
    if metadata.num_seqs == 0:
        return None
    rows = metadata.plan_cache.get((key,))
    if rows is None:
        if metadata.max_query_len == 1 and metadata.num_tokens == metadata.num_seqs:
            rows = _NativeRows.all_decodes(metadata.num_seqs, metadata.seq_lens, metadata.block_tables)
        else:
            prefills, decodes = _split_batch(metadata)
            rows = _NativeRows(decodes, prefills, metadata.block_tables)
        metadata.plan_cache[(key,)] = rows
    return rows


def _kv8_rows_ok(x: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """[n, heads, D] float32/bf16 rows the 8-bit kernels read: heads contiguous within a row, contiguous cache."""
    return (native.dtype_code(x.dtype) is not None and x.dim() == 3 and x.stride(2) == 1
            and x.stride(1) == x.shape[2] and kv_cache.is_contiguous() and x.shape[2] + 4 == kv_cache.shape[4])


def _forward_kv8(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                 window: int | None, out: torch.Tensor, causal: bool) -> torch.Tensor:
    """Every query row as a decode over its own prefix in the 8-bit C kernel; the torch reference without it."""
    lib = native.kernels()
    if lib is None or not causal or not (_kv8_rows_ok(query, kv_cache) and _kv8_rows_ok(out, kv_cache)):
        return paged_attention_reference(query, kv_cache, metadata, scale, window, out, causal=causal)
    rows = _prefix_rows(metadata, "cpu-sdpa-kv8")
    if rows is not None and rows.rows.numel() and not lib.decode_attention_kv8(
            query, out, kv_cache, rows.block_tables, rows.tables, rows.rows, rows.seq_lens, window, scale):
        raise RuntimeError("native 8-bit KV attention failed: a block table entry is outside the KV cache, or "
                           "scratch memory could not be allocated")
    return out


class _DecodeGroup:
    """Everything a bucket of decodes needs that depends on the step's metadata only (built once per step)."""

    __slots__ = ("row0", "rows", "m", "s_pad", "nblk", "blocks", "pad", "mask")

    def __init__(self, row0: int | None, rows: torch.Tensor, m: int, s_pad: int, nblk: int, blocks: torch.Tensor,
                 pad: torch.Tensor, mask: torch.Tensor) -> None:
        self.row0, self.rows, self.m, self.s_pad, self.nblk = row0, rows, m, s_pad, nblk
        self.blocks, self.pad, self.mask = blocks, pad, mask


class _NativeRows:
    """Every query row of the step as the C kernel takes it: (block table, query row, keys it sees). A prefill
    chunk's row ``j`` is a decode over the first ``context + j + 1`` positions, so one call covers the whole mixed
    batch, and a token's result does not depend on how its prompt was chunked."""

    __slots__ = ("tables", "rows", "seq_lens", "block_tables", "tiled_chunks")

    def __init__(self, decodes: list[tuple[int, int, int]], prefills: list[tuple[int, int, int, int]],
                 block_tables: torch.Tensor, tiled: list[tuple[int, int, int, int]] | None = None) -> None:
        tables = [torch.tensor([m[0] for m in decodes], dtype=torch.int32)]
        rows = [torch.tensor([m[1] for m in decodes], dtype=torch.int64)]
        seq_lens = [torch.tensor([m[2] for m in decodes], dtype=torch.int32)]
        for i, start, ql, sl in prefills:
            tables.append(torch.full((ql,), i, dtype=torch.int32))
            rows.append(torch.arange(start, start + ql, dtype=torch.int64))
            seq_lens.append(torch.arange(sl - ql + 1, sl + 1, dtype=torch.int32))
        self.tables, self.rows, self.seq_lens = torch.cat(tables), torch.cat(rows), torch.cat(seq_lens)
        self.block_tables = block_tables.to(torch.int32).contiguous()
        # prefill chunks for the query-tiled kernel: (table, first row, query length, sequence length)
        self.tiled_chunks = torch.tensor(tiled, dtype=torch.int32) if tiled else None

    @classmethod
    def all_decodes(cls, n: int, seq_lens: torch.Tensor, block_tables: torch.Tensor) -> _NativeRows:
        """A batch of ``n`` decodes, sequence ``i`` in row ``i``, reading the lengths from ``seq_lens`` in place:
        nothing about the step is read on the host, so a recorded step (llmctl_cpu.graph) stays valid when the
        lengths in that buffer change."""
        rows = cls.__new__(cls)
        rows.tables = torch.arange(n, dtype=torch.int32)
        rows.rows = torch.arange(n, dtype=torch.int64)
        rows.seq_lens = seq_lens[:n].to(torch.int32).contiguous()
        rows.block_tables = block_tables.to(torch.int32).contiguous()
        rows.tiled_chunks = None
        return rows


class _Plan:
    __slots__ = ("prefills", "_decodes", "native", "long_prefills", "_torch_decodes", "_seq_lens")

    def __init__(self, prefills: list[tuple[int, int, int, int]], decodes: list[tuple[int, int, int]] | None,
                 native: _NativeRows | None, long_prefills: list[tuple[int, int, int, int]],
                 seq_lens: torch.Tensor | None = None) -> None:
        self.prefills, self._decodes, self.native = prefills, decodes, native
        self.long_prefills = long_prefills  # with the C kernels: the chunks left to the flash kernel
        self._torch_decodes: list[_DecodeGroup] | None = None
        # For decodes=None (an all-decode step whose lengths are read only if needed): the step's sequence lengths,
        # not its metadata. The plan lives in ``metadata.plan_cache``, so a reference back to the metadata made a
        # cycle per step that only the cyclic collector freed (holding the step's tensors until then), and those
        # collections stalled the engine and the event loop together (docs/reliability.md, round three).
        self._seq_lens = seq_lens

    @property
    def decodes(self) -> list[tuple[int, int, int]]:
        """(seq, row, seq_len) per decode."""
        if self._decodes is None:
            assert self._seq_lens is not None
            self._decodes = [(i, i, sl) for i, sl in enumerate(self._seq_lens.tolist())]
        return self._decodes

    def torch_decodes(self, tables: torch.Tensor, block_size: int, window: int | None,
                      dtype: torch.dtype) -> list[_DecodeGroup]:
        """Bucketed gather plans for the torch decode path, built only when a step needs it (no C kernels, fp16)."""
        if self._torch_decodes is None:
            buckets: dict[int, list[tuple[int, int, int, int]]] = {}  # s_pad -> (seq, row, first key, key count)
            for i, row, sl in self.decodes:
                first = 0 if window is None else max(0, sl - window)
                keys = first % block_size + sl - first  # from the start of first's block to the last key
                buckets.setdefault(_ceil_to(keys, DECODE_BUCKET), []).append((i, row, first, sl - first))
            self._torch_decodes = [_decode_plan(tables, block_size, s_pad, members, dtype)
                                   for s_pad, members in buckets.items()]
        return self._torch_decodes


def _native_rows_ok(x: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """[n, heads, D] rows the C kernels can read: cache dtype, heads contiguous within a row, contiguous cache."""
    return (native.dtype_code(kv_cache.dtype) is not None and x.dtype == kv_cache.dtype and x.dim() == 3
            and x.stride(2) == 1 and x.stride(1) == x.shape[2] and kv_cache.is_contiguous())


def _native_query_ok(query: torch.Tensor, out: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    return _native_rows_ok(query, kv_cache) and _native_rows_ok(out, kv_cache)


def _plan(metadata: AttentionMetadata, block_size: int, window: int | None, dtype: torch.dtype,
          head_size: int) -> _Plan:
    """The step's work split (prefill chunks, decode buckets with their gather indices and masks), memoized in
    ``metadata.plan_cache`` so the model's layers share one copy."""
    cache_key = ("cpu-sdpa", block_size, window, dtype, head_size)
    plan = metadata.plan_cache.get(cache_key)
    if plan is not None:
        return plan
    n = metadata.num_seqs
    lib = native.kernels() if native.dtype_code(dtype) is not None else None
    if lib is not None and metadata.max_query_len == 1 and metadata.num_tokens == n:
        rows = _NativeRows.all_decodes(n, metadata.seq_lens, metadata.block_tables)
        plan = metadata.plan_cache[cache_key] = _Plan([], None, rows, [], metadata.seq_lens[:n])
        return plan
    prefills, decodes = _split_batch(metadata)
    rows = None
    long_prefills: list[tuple[int, int, int, int]] = []
    if lib is not None and lib.has_prefill_bf16 and dtype == torch.bfloat16 and window is None \
            and head_size in (64, 128):
        rows = _NativeRows(decodes, [], metadata.block_tables, prefills)  # every prefill chunk, any length
    elif lib is not None:
        short = [p for p in prefills if p[3] <= NATIVE_PREFILL_MAX_LEN]
        long_prefills = [p for p in prefills if p[3] > NATIVE_PREFILL_MAX_LEN]
        rows = _NativeRows(decodes, short, metadata.block_tables)
    plan = metadata.plan_cache[cache_key] = _Plan(prefills, decodes, rows, long_prefills)
    return plan


def _split_batch(metadata: AttentionMetadata) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int]]]:
    """(seq, first row, query length, seq_len) per prefill chunk and (seq, row, seq_len) per decode."""
    n = metadata.num_seqs
    q_lens = metadata.query_lens_cpu
    seq_lens = metadata.seq_lens_cpu
    if q_lens is None or len(q_lens) < n:
        q_lens = metadata.query_lens[:n].tolist()
    if seq_lens is None or len(seq_lens) < n:
        seq_lens = metadata.seq_lens[:n].tolist()
    prefills: list[tuple[int, int, int, int]] = []
    decodes: list[tuple[int, int, int]] = []
    start = 0
    for i in range(n):
        ql, sl = q_lens[i], seq_lens[i]
        if ql == 1:
            decodes.append((i, start, sl))
        elif ql > 1:
            prefills.append((i, start, ql, sl))
        start += ql
    return prefills, decodes


def _decode_plan(tables: torch.Tensor, block_size: int, s_pad: int, members: list[tuple[int, int, int, int]],
                 dtype: torch.dtype) -> _DecodeGroup:
    """Whole-block gather of a bucket: row ``r`` reads ``nblk`` blocks starting at its first key's block; key
    ``t`` of the kernel is position ``first_block * block_size + t``. Keys outside ``[off, off + eff)`` are masked
    out. Masked keys must still be finite (``0 * NaN`` would poison ``p @ V``): blocks past the sequence's last one
    repeat its first (full, hence written) block, and what remains — the unwritten tail of the last block, the
    keys before the window, everything when the sequence fits in one block — is zeroed after the gather."""
    m = len(members)
    nblk = -(-s_pad // block_size)
    seq = torch.tensor([x[0] for x in members])
    row_list = [x[1] for x in members]
    first = torch.tensor([x[2] for x in members])
    eff = torch.tensor([x[3] for x in members])
    b0 = first // block_size
    off = first - b0 * block_size
    last = (first + eff - 1) // block_size
    bidx = b0[:, None] + torch.arange(nblk)
    bidx = torch.where(bidx <= last[:, None], bidx, torch.where(last > b0, b0, last)[:, None])
    blocks = tables[seq].long().gather(1, bidx).flatten()
    t = torch.arange(nblk * block_size)
    valid = (t >= off[:, None]) & (t < (off + eff)[:, None])
    unsafe = (t < ((last - b0 + 1) * block_size)[:, None]) | (last == b0)[:, None]
    pad = (~valid & unsafe)[:, :s_pad].nonzero()
    pad = pad[:, 0] * (nblk * block_size) + pad[:, 1]
    mask = torch.zeros(m, 1, 1, s_pad, dtype=dtype).masked_fill_(~valid[:, None, None, :s_pad], float("-inf"))
    row0 = row_list[0] if row_list == list(range(row_list[0], row_list[0] + m)) else None
    return _DecodeGroup(row0, torch.tensor(row_list), m, s_pad, nblk, blocks, pad, mask)


def _decode_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 decodes one sequence per kernel call. In float32 the kernels' result for a sequence can change with
    how many sequences share the call (their work split follows the batch; bfloat16 does not show it), which
    would break batch invariance; one call per sequence makes the call shape a function of the sequence alone.
    float32 is the exactness dtype, so it pays this loop; bfloat16 (the speed dtype) keeps one call per bucket."""
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        out[i:i + 1] = F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], attn_mask=mask[i:i + 1],
                                                      scale=scale)
    return out


def _slots(table: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slots of token positions ``pos`` (any shape; ``table`` broadcast against ``pos // bs``)."""
    return table.long().gather(-1, pos // block_size) * block_size + pos % block_size


def _decode_group(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, g: _DecodeGroup,
                  scale: float) -> None:
    """One kernel call for decodes whose key counts share the padded length ``g.s_pad``."""
    _, _, block_size, kv_heads, head_size = kv_cache.shape
    heads = query.shape[1]
    group = heads // kv_heads
    m, s_pad, keys = g.m, g.s_pad, g.nblk * block_size
    k = kv_cache[0].index_select(0, g.blocks)
    v = kv_cache[1].index_select(0, g.blocks)
    if g.pad.numel():
        k.view(-1, kv_heads, head_size).index_fill_(0, g.pad, 0)
        v.view(-1, kv_heads, head_size).index_fill_(0, g.pad, 0)
    k = k.view(m, keys, kv_heads, head_size)[:, :s_pad].transpose(1, 2)
    v = v.view(m, keys, kv_heads, head_size)[:, :s_pad].transpose(1, 2)
    if g.row0 is not None:
        q = query[g.row0:g.row0 + m].view(m, kv_heads, group, head_size)
    else:
        q = query.index_select(0, g.rows).view(m, kv_heads, group, head_size)
    mask = g.mask if g.mask.dtype == q.dtype else g.mask.to(q.dtype)
    if q.dtype == torch.float32:
        res = _decode_fp32(q, k, v, mask, scale)
    else:
        res = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    dst = out.view(-1, kv_heads, group, head_size)
    if g.row0 is not None:
        dst[g.row0:g.row0 + m] = res
    else:
        dst.index_copy_(0, g.rows, res.to(out.dtype))


def _prefill(query: torch.Tensor, flat: torch.Tensor, out: torch.Tensor, start: int, q_len: int, seq_len: int,
             table: torch.Tensor, block_size: int, scale: float, window: int | None, key: torch.Tensor | None,
             value: torch.Tensor | None) -> None:
    """One sequence's chunk of ``q_len`` > 1 queries, the last of its ``seq_len`` positions."""
    ctx = seq_len - q_len
    _, _, kv_heads, head_size = flat.shape
    heads = query.shape[1]
    group = heads // kv_heads
    first = 0 if window is None else max(0, ctx + 1 - window)  # no query of the chunk sees keys before this
    if ctx == 0 and key is not None and value is not None:
        # the cache holds them rounded to its dtype: attend over exactly what a cache read would return
        k, v = key[start:start + q_len].to(flat.dtype), value[start:start + q_len].to(flat.dtype)
    else:
        kv = flat.index_select(1, _slots(table, torch.arange(first, seq_len), block_size))
        k, v = kv[0], kv[1]

    def kernel_view(x: torch.Tensor) -> torch.Tensor:  # [S, Hk, D] -> [Hk, group, S, D], stride 0 over group
        return x.permute(1, 0, 2).unsqueeze(1).expand(kv_heads, group, x.shape[0], head_size)

    k, v = kernel_view(k), kernel_view(v)
    causal = ctx == 0 and window is None  # keys == queries: the kernel's own causal mask, no mask tensor
    step = q_len if causal else QUERY_TILE
    for lo in range(0, q_len, step):
        hi = min(q_len, lo + step)
        q = query[start + lo:start + hi].view(hi - lo, kv_heads, group, head_size).permute(1, 2, 0, 3)
        if causal:
            res = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            n_keys = ctx + hi - first  # keys [first, ctx + hi) cover this tile
            q_pos = torch.arange(ctx + lo, ctx + hi)[:, None]
            k_pos = torch.arange(first, first + n_keys)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            res = F.scaled_dot_product_attention(q, k[:, :, :n_keys], v[:, :, :n_keys], attn_mask=mask,
                                                 scale=scale)
        out[start + lo:start + hi] = res.permute(2, 0, 1, 3).reshape(hi - lo, heads, head_size)
