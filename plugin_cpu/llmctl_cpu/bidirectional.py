"""Bidirectional attention for encoders on the CPU (the ``bidirectional`` feature of ``cpu-sdpa``).

Core computes a bidirectional sequence's whole prompt in one step, so its keys and values are exactly the ones
just written: no cache read is needed. Sequences are grouped by their length rounded up to ``LENGTH_BUCKET``
and each group is one 4-D call of torch's flash kernel over zero-padded queries, keys and values with the padded
keys masked out: one parallel region per group instead of one per sequence (on a loaded 2-core host a region
costs milliseconds), and a sequence's result never depends on the other sequences' contents. The gather and
scatter indices are planned once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from llmctl.attention import AttentionMetadata
from llmctl.layers.encoder_attention import check_whole_sequences

LENGTH_BUCKET = 32


@dataclass
class _Group:
    size: int  # sequences
    padded: int  # their common padded length
    src: torch.Tensor  # token rows of the flattened batch, sequence by sequence
    dst: torch.Tensor  # where each lands in the [size * padded] padded rows
    keep: torch.Tensor  # [size, 1, 1, padded] real keys


def _plan(metadata: AttentionMetadata) -> list[_Group]:
    cached = metadata.plan_cache.get("cpu-bidirectional")
    if cached is not None:
        return cached
    check_whole_sequences(metadata)
    lens = metadata.query_lens_cpu if metadata.query_lens_cpu is not None else metadata.query_lens.tolist()
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    members: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        if n:
            members.setdefault(-(-n // LENGTH_BUCKET) * LENGTH_BUCKET, []).append(i)
    groups = []
    for padded, seqs in members.items():
        src = torch.cat([torch.arange(starts[i], starts[i] + lens[i]) for i in seqs])
        dst = torch.cat([torch.arange(j * padded, j * padded + lens[i]) for j, i in enumerate(seqs)])
        keep = torch.zeros(len(seqs), 1, 1, padded, dtype=torch.bool)
        for j, i in enumerate(seqs):
            keep[j, 0, 0, : lens[i]] = True
        groups.append(_Group(len(seqs), padded, src, dst, keep))
    metadata.plan_cache["cpu-bidirectional"] = groups
    return groups


def _padded(x: torch.Tensor, g: _Group) -> torch.Tensor:
    """[tokens, heads, D] -> [size, heads, padded, D], zeros past each sequence's end."""
    flat = x.new_zeros(g.size * g.padded, x.shape[1], x.shape[2])
    flat.index_copy_(0, g.dst, x.index_select(0, g.src))
    return flat.view(g.size, g.padded, x.shape[1], x.shape[2]).permute(0, 2, 1, 3)


def bidirectional_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                            out: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor:
    if key is None or value is None:  # a caller that does not pass the new keys: read them back from the cache
        from llmctl.ops.paged_attention import paged_attention_reference

        return paged_attention_reference(query, kv_cache, metadata, scale, None, out, causal=False)
    groups = _plan(metadata)
    # rounded to the cache dtype, as a read of the cache would be
    key, value = key.to(kv_cache.dtype), value.to(kv_cache.dtype)
    heads, head_size = query.shape[1], query.shape[2]
    group = heads // key.shape[1]
    for g in groups:
        q, k, v = _padded(query, g), _padded(key, g), _padded(value, g)
        if group > 1:  # grouped-query keys repeated over their query heads (a 5-D view leaves the flash kernel)
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        res = F.scaled_dot_product_attention(q, k, v, attn_mask=g.keep, scale=scale)
        rows = res.permute(0, 2, 1, 3).reshape(g.size * g.padded, heads, head_size)
        out.index_copy_(0, g.src, rows.index_select(0, g.dst).to(out.dtype))
    return out
