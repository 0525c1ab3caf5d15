"""Paged self-attention over core's flattened batch, delegated to the selected backend."""

from __future__ import annotations

import torch

from llmctl.attention import AttentionMetadata
from llmctl.layers._module import EngineModule
from llmctl.plugins.types import AttentionBackend


class Attention(EngineModule):
    """Writes this step's keys/values into the layer's cache, then attends over each sequence's context.

    Queries may carry padding rows beyond ``slot_mapping`` (e.g. for captured graphs); only the real rows are
    written to the cache.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, backend: AttentionBackend,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.backend = backend

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """``query`` [T, H, D], ``key``/``value`` [T, Hk, D] -> [T, H * D]."""
        n = metadata.slot_mapping.shape[0]
        self.backend.write_kv(key[:n], value[:n], kv_cache, metadata.slot_mapping)
        out = self.backend.forward(query, kv_cache, metadata, self.scale, self.sliding_window,
                                   key=key[:n], value=value[:n])
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)
