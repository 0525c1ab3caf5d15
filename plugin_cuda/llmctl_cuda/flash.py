"""Attention through FlashAttention-2 and FlashInfer, when those packages are installed and the GPU suits them.

Both read the KV cache in core's layout ``[2, num_blocks, block_size, num_kv_heads, head_size]``: ``kv[0]`` and
``kv[1]`` are each ``[num_pages, page_size, num_kv_heads, head_size]``, the paged layout FlashAttention takes
with ``block_table`` and FlashInfer calls "NHD". Writing the cache uses the shared Triton ``write_kv`` kernel.
They rank above the Triton backend, so core prefers them whenever ``supports()`` says yes.
"""

from __future__ import annotations

import importlib.util
import weakref
from typing import Any

import torch
from llmctl.attention import AttentionMetadata
from llmctl.plugins.types import AttentionBackend, Support

HALF_DTYPES = (torch.float16, torch.bfloat16)
HANDLED_FEATURES = frozenset({"sliding_window", "prefix_caching", "chunked_prefill"})


def package_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _capability() -> tuple[int, int] | None:
    try:
        if torch.version.cuda is None or not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_capability()
    except Exception:
        return None


def _common_support(package: str, pip_name: str, dtype: torch.dtype, features: frozenset[str],
                    min_capability: tuple[int, int]) -> Support:
    if not package_installed(package):
        return Support(False, f"{package} is not installed (pip install {pip_name})")
    cap = _capability()
    if cap is None:
        return Support(False, "no CUDA GPU is available")
    if cap < min_capability:
        return Support(False, f"{package} needs compute capability >= {min_capability[0]}.{min_capability[1]}, "
                              f"this GPU has {cap[0]}.{cap[1]}")
    if dtype not in HALF_DTYPES:
        return Support(False, f"{package} runs fp16/bf16 only, not {dtype}")
    if dtype == torch.bfloat16 and cap < (8, 0):
        return Support(False, "bf16 needs compute capability >= 8.0")
    unknown = set(features) - HANDLED_FEATURES
    if unknown:
        return Support(False, f"features not handled by this backend: {', '.join(sorted(unknown))}")
    return Support(True)


def _write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    from llmctl_triton.cache import write_kv

    write_kv(key, value, kv_cache, slot_mapping)


def _finish(result: torch.Tensor, query: torch.Tensor, num_tokens: int, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        out = torch.zeros_like(query)
    elif out.shape[0] > num_tokens:
        out[num_tokens:].zero_()
    out[:num_tokens].copy_(result)
    return out


class FlashAttnBackend(AttentionBackend):
    """``flash_attn_varlen_func`` with ``block_table``: one launch for the whole mixed batch.

    FlashAttention-2's paged KV requires pages of a multiple of 256 tokens, so this backend only accepts such
    block sizes; with the default block size 16 core falls through to FlashInfer or Triton.
    """

    name = "flash-attn"
    platform = "cuda"
    priority = 30
    PAGE_MULTIPLE = 256

    def supports(self, dtype: torch.dtype, head_size: int, block_size: int, features: frozenset[str]) -> Support:
        base = _common_support("flash_attn", "flash-attn", dtype, features, (8, 0))
        if not base:
            return base
        if head_size % 8 or head_size > 256:
            return Support(False, f"flash_attn handles head sizes that are multiples of 8 up to 256, not {head_size}")
        if block_size % self.PAGE_MULTIPLE:
            return Support(False, f"flash_attn paged KV needs block_size to be a multiple of {self.PAGE_MULTIPLE}, "
                                  f"got {block_size}")
        return Support(True)

    def write_kv(self, key, value, kv_cache, slot_mapping) -> None:
        _write_kv(key, value, kv_cache, slot_mapping)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None, out: torch.Tensor | None = None, *,
                key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func

        n = metadata.num_tokens
        cu_k = torch.zeros(metadata.num_seqs + 1, dtype=torch.int32, device=query.device)
        torch.cumsum(metadata.seq_lens, 0, out=cu_k[1:])
        # Our window: a query at p sees keys > p - W, i.e. W - 1 keys to its left plus itself.
        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        result = flash_attn_varlen_func(
            query[:n], kv_cache[0], kv_cache[1],
            cu_seqlens_q=metadata.query_start_loc, cu_seqlens_k=cu_k,
            max_seqlen_q=metadata.max_query_len, max_seqlen_k=metadata.max_seq_len,
            softmax_scale=scale, causal=True, window_size=window, block_table=metadata.block_tables,
        )
        return _finish(result, query, n, out)


class FlashInferBackend(AttentionBackend):
    """FlashInfer's ``BatchPrefillWithPagedKVCacheWrapper``, which serves mixed prefill/decode batches.

    ``plan`` (host-side scheduling) runs once per step: core hands every layer the same metadata object, so the
    plan is cached against it and only ``run`` is called per layer.
    """

    name = "flashinfer"
    platform = "cuda"
    priority = 20
    HEAD_SIZES = (64, 128, 256)
    WORKSPACE_BYTES = 128 * 1024 * 1024

    def __init__(self) -> None:
        self._wrappers: dict[torch.device, Any] = {}
        self._planned: tuple[Any, tuple[Any, ...]] | None = None

    def supports(self, dtype: torch.dtype, head_size: int, block_size: int, features: frozenset[str]) -> Support:
        base = _common_support("flashinfer", "flashinfer-python", dtype, features, (7, 5))
        if not base:
            return base
        if head_size not in self.HEAD_SIZES:
            return Support(False, f"flashinfer is used here for head sizes {self.HEAD_SIZES}, not {head_size}")
        return Support(True)

    def write_kv(self, key, value, kv_cache, slot_mapping) -> None:
        _write_kv(key, value, kv_cache, slot_mapping)

    def _wrapper(self, device: torch.device) -> Any:
        wrapper = self._wrappers.get(device)
        if wrapper is None:
            import flashinfer

            workspace = torch.empty(self.WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
            self._wrappers[device] = wrapper
        return wrapper

    def _plan(self, wrapper: Any, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
              scale: float, sliding_window: int | None) -> None:
        num_heads, head = query.shape[1], query.shape[2]
        block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
        key = (num_heads, num_kv_heads, head, block_size, float(scale), sliding_window, query.dtype)
        if self._planned is not None and self._planned[0]() is metadata and self._planned[1] == key:
            return
        seq_lens = metadata.seq_lens.to(torch.int32)
        pages = (seq_lens + block_size - 1) // block_size
        kv_indptr = torch.zeros(metadata.num_seqs + 1, dtype=torch.int32, device=query.device)
        torch.cumsum(pages, 0, out=kv_indptr[1:])
        cols = torch.arange(metadata.block_tables.shape[1], device=query.device)
        kv_indices = metadata.block_tables[cols.unsqueeze(0) < pages.unsqueeze(1)].to(torch.int32)
        last_page_len = seq_lens - (pages - 1) * block_size
        wrapper.plan(
            metadata.query_start_loc.to(torch.int32), kv_indptr, kv_indices, last_page_len,
            num_heads, num_kv_heads, head, block_size,
            causal=True, sm_scale=float(scale),
            window_left=(sliding_window - 1) if sliding_window else -1,
            q_data_type=query.dtype, kv_data_type=kv_cache.dtype,
        )
        self._planned = (weakref.ref(metadata), key)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None, out: torch.Tensor | None = None, *,
                key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
        wrapper = self._wrapper(query.device)
        self._plan(wrapper, query, kv_cache, metadata, scale, sliding_window)
        n = metadata.num_tokens
        result = wrapper.run(query[:n], (kv_cache[0], kv_cache[1]))
        return _finish(result, query, n, out)
