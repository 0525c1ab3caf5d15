"""Paged self-attention over core's flattened batch, delegated to the selected backend."""

from __future__ import annotations

import math

import torch

from llmctl.attention import AttentionMetadata
from llmctl.layers._module import EngineModule
from llmctl.plugins.types import AttentionBackend


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi head slopes of the paper (and of BLOOM/MPT in transformers): a geometric sequence from
    ``2^(-8/n)`` for the closest power of two ``n``, with the odd heads of ``2n`` filling a non-power-of-two count."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (i + 1) for i in range(0, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class Attention(EngineModule):
    """Writes this step's keys/values into the layer's cache, then attends over each sequence's context.

    Queries may carry padding rows beyond ``slot_mapping`` (e.g. for captured graphs); only the real rows are
    written to the cache. ``logits_soft_cap`` and ``alibi_slopes`` are attention features (see
    ``llmctl.plugins.types.MODEL_ATTENTION_FEATURES``): passed to the backend only when set, so backends that do
    not know them never see them.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, backend: AttentionBackend,
                 sliding_window: int | None = None, *, logits_soft_cap: float | None = None,
                 alibi_slopes: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.backend = backend
        self.feature_kwargs: dict[str, object] = {}
        if logits_soft_cap is not None:
            self.feature_kwargs["logits_soft_cap"] = float(logits_soft_cap)
        if alibi_slopes is not None:
            self.feature_kwargs["alibi_slopes"] = alibi_slopes

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """``query`` [T, H, D], ``key``/``value`` [T, Hk, D] -> [T, H * D]."""
        n = metadata.slot_mapping.shape[0]
        self.backend.write_kv(key[:n], value[:n], kv_cache, metadata.slot_mapping)
        out = self.backend.forward(query, kv_cache, metadata, self.scale, self.sliding_window,
                                   key=key[:n], value=value[:n], **self.feature_kwargs)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)
