"""Paged attention on Intel GPUs through Intel Extension for PyTorch (``ipex.llm.modules.PagedAttention``).

Layout: core's default ``[2, num_blocks, block_size, num_kv_heads, head_size]``; ``kv_cache[0]`` and
``kv_cache[1]`` are exactly the ``[num_blocks, block_size, num_kv_heads, head_size]`` key/value caches IPEX's
XPU kernels take, so no copy is needed. ``flash_attn_varlen_func`` handles the whole mixed batch (prefill
chunks on top of cached prefixes and decodes) in one call, with cumulative query and context lengths.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

import torch
from llmctl.attention import AttentionMetadata
from llmctl.plugins.types import AttentionBackend, Support

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_SIZES = (64, 80, 96, 128, 256)
HANDLED_FEATURES = frozenset({"prefix_caching", "chunked_prefill", "sliding_window"})


@cache
def load_ipex() -> tuple[Any | None, str]:
    """(ipex.llm.modules.PagedAttention, "") or (None, why not). Cached: importing IPEX is slow."""
    try:
        mod = importlib.import_module("intel_extension_for_pytorch.llm.modules")
    except ImportError as exc:
        return None, (f"intel_extension_for_pytorch is not installed ({exc}); pip install 'llmctl-xpu[ipex]' "
                      f"(the core torch-reference backend runs meanwhile)")
    except Exception as exc:  # IPEX raises other errors on version mismatch with torch
        return None, f"intel_extension_for_pytorch failed to import: {type(exc).__name__}: {exc}"
    paged = getattr(mod, "PagedAttention", None)
    if paged is None or not hasattr(paged, "flash_attn_varlen_func"):
        return None, "this intel_extension_for_pytorch has no PagedAttention.flash_attn_varlen_func (upgrade IPEX)"
    return paged, ""


class IpexPagedAttention(AttentionBackend):
    name = "xpu-ipex-paged"
    platform = "xpu"
    priority = 10

    def supports(self, dtype: torch.dtype, head_size: int, block_size: int, features: frozenset[str]) -> Support:
        paged, reason = load_ipex()
        if paged is None:
            return Support(False, reason)
        if dtype not in SUPPORTED_DTYPES:
            return Support(False, f"dtype {dtype} not supported by IPEX paged attention")
        if head_size not in SUPPORTED_HEAD_SIZES:
            return Support(False, f"head_size {head_size} not supported (IPEX kernels: {SUPPORTED_HEAD_SIZES})")
        if block_size % 16:
            return Support(False, f"block_size {block_size} must be a multiple of 16")
        missing = features - HANDLED_FEATURES
        if missing:
            return Support(False, f"features not implemented: {', '.join(sorted(missing))}")
        return Support(True)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        paged, reason = load_ipex()
        if paged is None:
            raise RuntimeError(reason)
        # Core marks padding with slot -1; drop those rows here rather than rely on the kernel's bounds handling.
        keep = slot_mapping >= 0
        paged.reshape_and_cache(key[keep], value[keep], kv_cache[0], kv_cache[1], slot_mapping[keep].long())

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None, out: torch.Tensor | None = None, *,
                key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
        paged, reason = load_ipex()
        if paged is None:
            raise RuntimeError(reason)
        n = metadata.num_tokens
        if out is None:
            out = torch.empty_like(query)
        seq_lens = metadata.seq_lens.to(torch.int32)
        cu_seqlens_kv = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32, device=query.device)
        torch.cumsum(seq_lens, dim=0, out=cu_seqlens_kv[1:])
        window_left = -1 if sliding_window is None else sliding_window - 1
        result = out[:n]
        paged.flash_attn_varlen_func(
            result, query[:n].contiguous(), kv_cache[0], kv_cache[1],
            metadata.query_start_loc.to(torch.int32), cu_seqlens_kv, metadata.max_query_len, metadata.max_seq_len,
            scale, True, metadata.block_tables.to(torch.int32), None,
            window_size_left=window_left, window_size_right=-1 if sliding_window is None else 0,
        )
        return out
