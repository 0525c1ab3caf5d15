"""Bidirectional (non-causal) paged self-attention, for encoders (BERT and its kin).

Every token attends to every token of its own sequence, so a sequence's whole prompt must be in one step: core
never chunks a pooling request, and backends check it. Only a backend that declares the ``bidirectional``
feature in ``supports`` is ever selected for a model that needs it (the torch reference always does), and
such a backend takes ``causal=False`` in ``forward``.
"""

from __future__ import annotations

import torch

from llmctl.attention import AttentionMetadata
from llmctl.layers.attention import Attention

BIDIRECTIONAL = "bidirectional"


class EncoderAttention(Attention):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """``query`` [T, H, D], ``key``/``value`` [T, Hk, D] -> [T, H * D]."""
        n = metadata.slot_mapping.shape[0]
        self.backend.write_kv(key[:n], value[:n], kv_cache, metadata.slot_mapping)
        out = self.backend.forward(query, kv_cache, metadata, self.scale, None, causal=False, key=key[:n],
                                   value=value[:n])
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)


def check_whole_sequences(metadata: AttentionMetadata) -> None:
    """Bidirectional attention over a partial sequence would silently miss the keys of later tokens."""
    q_lens = metadata.query_lens_cpu
    s_lens = metadata.seq_lens_cpu
    if q_lens is None or s_lens is None:
        q_lens, s_lens = metadata.query_lens.tolist(), metadata.seq_lens.tolist()
    for i, (q, s) in enumerate(zip(q_lens, s_lens, strict=True)):
        if q != s:
            raise ValueError(f"bidirectional attention needs each sequence's whole prompt in one step; sequence {i} "
                             f"has {q} of its {s} tokens in this step")
