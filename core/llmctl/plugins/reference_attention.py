"""The torch reference as a registered attention backend: it runs on any platform (lowest priority), so a new
platform works end to end before it has kernels of its own, and tests can force it as the oracle."""

from __future__ import annotations

import torch

from llmctl.attention import AttentionMetadata
from llmctl.ops.paged_attention import paged_attention_reference, write_kv_reference
from llmctl.plugins.types import ANY_PLATFORM, AttentionBackend, Support


class TorchReferenceAttention(AttentionBackend):
    name = "torch-reference"
    platform = ANY_PLATFORM
    priority = -100

    def supports(self, dtype: torch.dtype, head_size: int, block_size: int, features: frozenset[str]) -> Support:
        return Support(True)  # every feature in MODEL_ATTENTION_FEATURES, by construction the oracle

    def write_kv(self, key, value, kv_cache, slot_mapping) -> None:
        write_kv_reference(key, value, kv_cache, slot_mapping)

    def forward(self, query, kv_cache, metadata: AttentionMetadata, scale, sliding_window=None, out=None, *,
                key=None, value=None, causal: bool = True, logits_soft_cap: float | None = None,
                alibi_slopes: torch.Tensor | None = None):
        return paged_attention_reference(query, kv_cache, metadata, scale, sliding_window, out, causal=causal,
                                         logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes)
