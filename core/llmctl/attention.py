"""What an attention backend is told about one step's flattened batch.

The runner builds one of these per step and passes it down through the model to every attention layer, so
no kernel needs global state. Sequences are laid end to end in the token dimension: sequence ``i`` owns query
rows ``query_start_loc[i]:query_start_loc[i+1]``; those are the *last* ``query_lens[i]`` tokens of its
``seq_lens[i]`` tokens of context (earlier ones were computed in earlier steps or come from the prefix cache).
A decode is simply a sequence with one query token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    num_tokens: int  # rows of the query that belong to real sequences
    num_seqs: int
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat KV slot for each new token (-1: skip)
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Host copies for backends that loop or bucket on the CPU side; kept to avoid device->host syncs.
    query_lens_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    # Backends may memoize tensors derived from this step's metadata here (e.g. gather indices, masks); it lives
    # exactly one step (the runner builds fresh metadata each step), and the layers of one step share it. Keys
    # should name the backend and every input the value depends on besides the metadata (block size, window...).
    plan_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_all_decode(self) -> bool:
        return self.max_query_len == 1

    @property
    def query_lens(self) -> torch.Tensor:
        return self.query_start_loc[1:] - self.query_start_loc[:-1]

    @property
    def context_lens(self) -> torch.Tensor:
        """Tokens already in the cache before this step (prefix hits plus earlier chunks)."""
        return self.seq_lens - self.query_lens


def build_attention_metadata(query_lens: list[int], seq_lens: list[int] | torch.Tensor,
                             block_tables: torch.Tensor, slot_mapping: torch.Tensor, block_size: int,
                             device: torch.device, *, query_start_loc: torch.Tensor | None = None,
                             max_seq_len: int | None = None) -> AttentionMetadata:
    """The one place a step's metadata is assembled, for every kind of step: the runner's general and
    all-decode paths, the decode graph's capture (whose tensors are static buffers and whose host lengths are
    unknown: ``seq_lens`` is then that buffer and ``max_seq_len`` the worst case) and the profiling pass.
    ``block_tables`` and ``slot_mapping`` come on the host or the device; they are moved to ``device``."""
    n = len(query_lens)
    if query_start_loc is None:
        if max(query_lens, default=1) == 1:
            query_start_loc = torch.arange(n + 1, dtype=torch.int32)
        else:
            query_start_loc = torch.zeros(n + 1, dtype=torch.int32)
            torch.cumsum(torch.tensor(query_lens, dtype=torch.int32), 0, out=query_start_loc[1:])
    if isinstance(seq_lens, torch.Tensor):
        if max_seq_len is None:
            raise ValueError("max_seq_len: required when seq_lens is a device buffer")
        seq_lens_t, seq_lens_cpu = seq_lens, None
    else:
        seq_lens_t, seq_lens_cpu = torch.tensor(seq_lens, dtype=torch.int32, device=device), seq_lens
        max_seq_len = max(seq_lens) if max_seq_len is None else max_seq_len
    return AttentionMetadata(
        num_tokens=sum(query_lens), num_seqs=n, query_start_loc=query_start_loc.to(device), seq_lens=seq_lens_t,
        block_tables=block_tables.to(device), slot_mapping=slot_mapping.to(device),
        max_query_len=max(query_lens, default=0), max_seq_len=max_seq_len, block_size=block_size,
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens_cpu)
