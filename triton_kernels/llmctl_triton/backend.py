"""``TritonAttentionBackend``: the library's kernels behind core's AttentionBackend contract.

The class is platform-neutral; each GPU plugin registers an instance bound to its platform name, so CUDA and
ROCm run the same kernels without either plugin copying them.
"""

from __future__ import annotations

import torch
from llmctl.attention import AttentionMetadata
from llmctl.kv.cache_dtype import KV_CACHE_FEATURES
from llmctl.plugins.types import AttentionBackend, OpOverride, Support

DEFAULT_PARTITION = 512  # keys per split-K partition; mirrors llmctl_triton.attention without importing Triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# plus 8-bit KV caches (int8, fp8 e4m3 / e5m2: llmctl_triton.kv8)
SUPPORTED_FEATURES = frozenset({"sliding_window", "prefix_caching", "chunked_prefill"}) | KV_CACHE_FEATURES
MAX_HEAD_SIZE = 256


class TritonAttentionBackend(AttentionBackend):
    """Paged attention in Triton for any platform whose torch device Triton compiles for."""

    name = "triton"
    # The decode path reads lengths from tensors only, sizes grids from num_seqs/max_seq_len, skips slot -1 and
    # gives empty (seq_len 0) padding sequences a zero output, so it replays from a captured graph.
    supports_graph_capture = True

    def __init__(self, platform: str, priority: int = 10, partition_size: int = DEFAULT_PARTITION,
                 name: str = "triton") -> None:
        # Core's registry keys backends by name alone, so a second platform's instance needs its own name
        # (e.g. "triton-rocm") or it would replace the first one.
        self.name = name
        self.platform = platform
        self.priority = priority
        self.partition_size = partition_size

    def supports(self, dtype: torch.dtype, head_size: int, block_size: int, features: frozenset[str]) -> Support:
        if dtype not in SUPPORTED_DTYPES:
            return Support(False, f"dtype {dtype} is not supported (fp16, bf16, fp32 are)")
        if not 8 <= head_size <= MAX_HEAD_SIZE or head_size % 8:
            return Support(False, f"head_size {head_size} is not supported (multiples of 8 up to {MAX_HEAD_SIZE})")
        if block_size < 1:
            return Support(False, f"block_size {block_size} must be positive")
        unknown = set(features) - SUPPORTED_FEATURES
        if unknown:
            return Support(False, f"features not implemented by the Triton kernels: {', '.join(sorted(unknown))}")
        return Support(True)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        from llmctl_triton.cache import write_kv
        from llmctl_triton.kv8 import cache_format, write_kv8

        if cache_format(kv_cache):
            write_kv8(key, value, kv_cache, slot_mapping)
        else:
            write_kv(key, value, kv_cache, slot_mapping)

    def forward(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        out: torch.Tensor | None = None,
        *,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from llmctl_triton.attention import paged_attention

        return paged_attention(query, kv_cache, metadata, scale, sliding_window, out,
                               partition_size=self.partition_size)


def op_overrides(platform: str, priority: int = 10) -> list[OpOverride]:
    """The fused elementwise kernels, the LoRA op and the MoE experts as op overrides for ``platform`` (sampling
    ops stay on the reference)."""
    from llmctl_triton.ops import (
        fused_add_rms_norm,
        fused_moe,
        lora_shrink_expand,
        rms_norm,
        rotary_embedding,
        silu_and_mul,
    )

    return [
        OpOverride("rms_norm", rms_norm, platform, priority),
        OpOverride("fused_add_rms_norm", fused_add_rms_norm, platform, priority),
        OpOverride("rotary_embedding", rotary_embedding, platform, priority),
        OpOverride("silu_and_mul", silu_and_mul, platform, priority),
        OpOverride("lora_shrink_expand", lora_shrink_expand, platform, priority),
        OpOverride("fused_moe", fused_moe, platform, priority),
    ]
