"""Paged attention on TPU through torch_xla's ragged paged attention kernel.

Layout: ``[num_blocks + 1, block_size, 2 * num_kv_heads, head_size]`` with keys and values interleaved on the
head axis (key of kv head ``h`` at ``2h``, value at ``2h + 1``), the "combined" layout the kernel reads in one
DMA per page. The extra last block is a scratch page: slot ``-1`` (padding) is redirected there, so a write
has a static shape (no boolean filtering, which would make XLA recompile per batch) and padding never lands
in a real block. Block tables never name the scratch block, so it is never read.
"""

from __future__ import annotations

import torch
from llmctl.attention import AttentionMetadata
from llmctl.plugins.types import AttentionBackend, Support

from llmctl_tpu.platform import torch_xla_missing

SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)
HANDLED_FEATURES = frozenset({"prefix_caching", "chunked_prefill", "sliding_window"})


def write_kv_combined(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V into the combined layout; pure torch, so it runs (and is tested) on the CPU too."""
    num_pages, block_size = kv_cache.shape[0], kv_cache.shape[1]
    scratch = (num_pages - 1) * block_size  # first slot of the scratch page
    slots = torch.where(slot_mapping >= 0, slot_mapping, torch.full_like(slot_mapping, scratch)).long()
    t, h, d = key.shape
    kv = torch.stack((key, value), dim=2).reshape(t, 2 * h, d).to(kv_cache.dtype)
    flat = kv_cache.view(num_pages * block_size, 2 * h, d)
    flat.index_copy_(0, slots, kv)


def to_reference_layout(kv_cache: torch.Tensor) -> torch.Tensor:
    """The same cache as core's ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (scratch page
    dropped), for tests and debugging."""
    pages = kv_cache[:-1]
    return torch.stack((pages[:, :, 0::2], pages[:, :, 1::2]), dim=0)


class RaggedPagedAttention(AttentionBackend):
    name = "tpu-ragged-paged"
    platform = "tpu"
    priority = 10

    def supports(self, dtype: torch.dtype, head_size: int, block_size: int, features: frozenset[str]) -> Support:
        missing = torch_xla_missing()
        if missing:
            return Support(False, missing)
        if dtype not in SUPPORTED_DTYPES:
            return Support(False, f"dtype {dtype} not supported on TPU (use bfloat16 or float32)")
        if head_size % 64:
            return Support(False, f"head_size {head_size} must be a multiple of 64 for the ragged paged kernel")
        if block_size % 16:
            return Support(False, f"block_size {block_size} must be a multiple of 16")
        unhandled = features - HANDLED_FEATURES
        if unhandled:
            return Support(False, f"features not implemented: {', '.join(sorted(unhandled))}")
        try:
            from torch_xla.experimental.custom_kernel import ragged_paged_attention  # noqa: F401
        except Exception as exc:
            return Support(False, f"this torch_xla has no ragged_paged_attention ({type(exc).__name__}: {exc}); "
                                  f"upgrade to torch_xla >= 2.7")
        return Support(True)

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        return (num_blocks + 1, block_size, 2 * num_kv_heads, head_size)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        write_kv_combined(key, value, kv_cache, slot_mapping)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None, out: torch.Tensor | None = None, *,
                key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
        from torch_xla.experimental.custom_kernel import ragged_paged_attention

        num_seqs = torch.tensor([metadata.num_seqs], dtype=torch.int32, device=query.device)
        result = ragged_paged_attention(
            query, kv_cache, metadata.seq_lens.to(torch.int32), metadata.block_tables.to(torch.int32),
            metadata.query_start_loc.to(torch.int32), num_seqs, sm_scale=scale, sliding_window=sliding_window)
        if out is None:
            return result
        out.copy_(result)
        return out
