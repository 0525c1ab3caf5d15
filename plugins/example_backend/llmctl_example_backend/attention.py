"""Paged attention for ``example-cpu``: one sequence at a time, torch.matmul and an explicit softmax.

This is deliberately a different kernel path from core's reference (which uses einsum and
``Tensor.softmax`` over the standard layout), so the testkit has something real to compare. It also uses its
own KV layout, ``[num_blocks, 2, num_kv_heads, block_size, head_size]`` (head-major, keys and values of a
block side by side), to show that the layout is the backend's business: core only allocates the tensor from
``kv_cache_shape`` and hands it back to ``write_kv`` and ``forward``.
"""

from __future__ import annotations

import torch
from llmctl.attention import AttentionMetadata
from llmctl.plugins.types import AttentionBackend, Support

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HANDLED_FEATURES = frozenset({"sliding_window", "prefix_caching", "chunked_prefill"})


class ExampleMatmulAttention(AttentionBackend):
    name = "example-matmul"  # VENDOR: your backend name (users can force it with LLMCTL_ATTENTION_BACKEND)
    platform = "example-cpu"
    priority = 10  # above core's reference (-100), so it is picked on this platform
    # VENDOR: True only when write_kv + forward of an all-decode batch can be captured in your graph API and
    # replayed (no host reads; see AttentionBackend.supports_graph_capture); this kernel reads lengths on the host.
    supports_graph_capture = False

    def supports(self, dtype: torch.dtype, head_size: int, block_size: int, features: frozenset[str]) -> Support:
        # VENDOR: state your kernel's real limits, each with a reason a user can act on.
        if dtype not in SUPPORTED_DTYPES:
            return Support(False, f"dtype {dtype} not supported (supported: {', '.join(map(str, SUPPORTED_DTYPES))})")
        if head_size > 256 or head_size % 8:
            return Support(False, f"head_size {head_size} not supported (multiples of 8 up to 256)")
        missing = features - HANDLED_FEATURES
        if missing:
            return Support(False, f"features not implemented: {', '.join(sorted(missing))}")
        return Support(True)

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        # VENDOR: the layout your kernels want.
        return (num_blocks, 2, num_kv_heads, block_size, head_size)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        # VENDOR: your reshape-and-cache kernel. Slot -1 marks padding and must be skipped.
        block_size = kv_cache.shape[3]
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        blocks, offsets = slots // block_size, slots % block_size
        # Advanced indexing on (block, :, :, offset) puts the indexed dims first: [n, 2, heads, head_size].
        kv = torch.stack((key[keep], value[keep]), dim=1).to(kv_cache.dtype)
        kv_cache[blocks, :, :, offsets] = kv

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None, out: torch.Tensor | None = None, *,
                key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
        # VENDOR: your paged-attention kernel; everything it needs is in `metadata`. `key`/`value` are this
        # step's new keys/values (already written with write_kv); a kernel can attend over a fresh prefill from
        # them instead of reading the cache back. This one reads everything from the cache and ignores them.
        if out is None:
            out = torch.empty_like(query)
        starts = metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens_cpu if metadata.seq_lens_cpu is not None else metadata.seq_lens.tolist()
        block_size = kv_cache.shape[3]
        num_kv_heads = kv_cache.shape[2]
        group = query.shape[1] // num_kv_heads
        for i in range(metadata.num_seqs):
            q_start, q_end = starts[i], starts[i + 1]
            q_len, kv_len = q_end - q_start, int(seq_lens[i])
            if q_len == 0:
                continue
            n_blocks = -(-kv_len // block_size)
            blocks = kv_cache[metadata.block_tables[i, :n_blocks].long()]  # [n, 2, Hkv, bs, D]
            # -> [Hkv, n * bs, D], then only the first kv_len positions (the tail of the last block is garbage).
            k = blocks[:, 0].permute(1, 0, 2, 3).reshape(num_kv_heads, -1, blocks.shape[-1])[:, :kv_len]
            v = blocks[:, 1].permute(1, 0, 2, 3).reshape(num_kv_heads, -1, blocks.shape[-1])[:, :kv_len]
            # Group query heads under their kv head: [Hkv, group * q_len, D].
            q = query[q_start:q_end].float().view(q_len, num_kv_heads, group, -1).permute(1, 2, 0, 3)
            q = q.reshape(num_kv_heads, group * q_len, -1)
            scores = torch.matmul(q, k.float().transpose(1, 2)) * scale  # [Hkv, group * q_len, kv_len]
            q_pos = (torch.arange(q_len, device=query.device) + kv_len - q_len).repeat(group)
            k_pos = torch.arange(kv_len, device=query.device)
            visible = k_pos[None, :] <= q_pos[:, None]
            if sliding_window is not None:
                visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
            scores = scores.masked_fill(~visible, float("-inf"))
            scores = scores - scores.amax(dim=-1, keepdim=True)
            weights = scores.exp()
            weights = weights / weights.sum(dim=-1, keepdim=True)
            o = torch.matmul(weights, v.float())  # [Hkv, group * q_len, D]
            o = o.view(num_kv_heads, group, q_len, -1).permute(2, 0, 1, 3).reshape(q_len, query.shape[1], -1)
            out[q_start:q_end] = o.to(out.dtype)
        return out
