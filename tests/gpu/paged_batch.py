"""Random paged-KV batches shaped like core's flattened step, shared by the interpreter and native GPU tests."""

from __future__ import annotations

import math

import torch
from llmctl.attention import AttentionMetadata


def make_batch(gen: torch.Generator, q_lens: list[int], ctx_lens: list[int], block_size: int, num_kv_heads: int,
               head: int, dtype: torch.dtype,
               device: str | torch.device = "cpu") -> tuple[torch.Tensor, AttentionMetadata]:
    """A random KV cache and the metadata of a flattened batch whose sequence ``i`` has ``ctx_lens[i]`` cached
    tokens (prefix hits / earlier chunks) followed by ``q_lens[i]`` new ones. Physical blocks are shuffled so
    block-table indirection is exercised; spare blocks hold garbage the kernels must not read. Everything is
    drawn on the CPU from ``gen`` (so a seed replays on any device) and then moved to ``device``."""
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    n_blocks = [math.ceil(s / block_size) for s in seq_lens]
    total = sum(n_blocks) + 3
    perm = torch.randperm(total, generator=gen)
    max_blocks = max(n_blocks)
    block_tables = torch.zeros(len(q_lens), max_blocks, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(n_blocks):
        block_tables[i, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    kv = torch.randn(2, total, block_size, num_kv_heads, head, generator=gen).to(dtype)
    slots = []
    for i, (c, s) in enumerate(zip(ctx_lens, seq_lens, strict=True)):
        slots += [int(block_tables[i, p // block_size]) * block_size + p % block_size for p in range(c, s)]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(
        num_tokens=sum(q_lens), num_seqs=len(q_lens), query_start_loc=qsl,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=block_tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        block_size=block_size, query_lens_cpu=list(q_lens), seq_lens_cpu=seq_lens)
    if torch.device(device).type != "cpu":
        for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
            setattr(meta, name, getattr(meta, name).to(device))
        kv = kv.to(device)
    return kv, meta


def ragged(gen: torch.Generator, n: int, lo: int, hi: int) -> list[int]:
    return torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
