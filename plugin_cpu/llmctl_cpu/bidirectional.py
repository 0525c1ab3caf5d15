"""Bidirectional attention for encoders on the CPU (the ``bidirectional`` feature of ``cpu-sdpa``).

Core computes a bidirectional sequence's whole prompt in one step, so its keys and values are exactly the ones
just written, and one non-causal call of torch's flash kernel per sequence over them is the whole job: no cache
read, no mask. One call per sequence keeps a sequence's result independent of the rest of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from llmctl.attention import AttentionMetadata
from llmctl.layers.encoder_attention import check_whole_sequences


def bidirectional_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                            out: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor:
    check_whole_sequences(metadata)
    if key is None or value is None:  # a caller that does not pass the new keys: read them back from the cache
        from llmctl.ops.paged_attention import paged_attention_reference

        return paged_attention_reference(query, kv_cache, metadata, scale, None, out, causal=False)
    heads, head_size = query.shape[1], query.shape[2]
    kv_heads = key.shape[1]
    group = heads // kv_heads
    qsl = metadata.query_lens_cpu
    starts = [0]
    for n in qsl if qsl is not None else metadata.query_lens.tolist():
        starts.append(starts[-1] + n)
    for lo, hi in zip(starts, starts[1:]):
        if hi == lo:
            continue
        # [S, Hk, D] -> [Hk, group, S, D] (stride 0 over the group), rounded to the cache dtype as a read would be
        k = key[lo:hi].to(kv_cache.dtype).permute(1, 0, 2).unsqueeze(1).expand(kv_heads, group, hi - lo, head_size)
        v = value[lo:hi].to(kv_cache.dtype).permute(1, 0, 2).unsqueeze(1).expand(kv_heads, group, hi - lo, head_size)
        q = query[lo:hi].view(hi - lo, kv_heads, group, head_size).permute(1, 2, 0, 3)
        res = F.scaled_dot_product_attention(q, k, v, is_causal=False, scale=scale)
        out[lo:hi] = res.permute(2, 0, 1, 3).reshape(hi - lo, heads, head_size)
    return out
