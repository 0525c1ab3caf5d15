"""Shape bucketing for XLA: pad each step's batch to one of a few fixed sizes so the TPU compiles a bounded
number of graphs (one per (tokens, seqs) bucket pair) instead of one per distinct batch.

Pure Python plus torch tensor padding; nothing here needs torch_xla, so it is tested on any machine.
Padding conventions (what the attention kernels and the reference rely on):

- padded query rows come after the last real one and belong to no sequence (``num_tokens`` stays the real
  count; their slot is ``-1`` so write_kv skips them);
- padded sequences have zero query tokens (``query_start_loc`` repeats its last value) and ``seq_len`` 0;
- block tables are widened with block 0 to a fixed width, which is never read past a sequence's length.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from llmctl.attention import AttentionMetadata


def power_of_two_buckets(minimum: int, maximum: int) -> list[int]:
    """``minimum, 2*minimum, ...`` up to ``maximum``, which is always the last bucket even if not a power of
    two (so the largest allowed batch needs no padding beyond the engine's own limit)."""
    if minimum < 1 or maximum < 1:
        raise ValueError(f"bucket bounds must be >= 1, got min={minimum}, max={maximum}")
    if minimum & (minimum - 1):
        raise ValueError(f"minimum bucket must be a power of two, got {minimum}")
    buckets, b = [], minimum
    while b < maximum:
        buckets.append(b)
        b *= 2
    buckets.append(maximum)
    return buckets


def bucket_for(n: int, buckets: list[int]) -> int:
    """Smallest bucket >= n."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclass(frozen=True)
class BucketConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    min_tokens: int = 16
    min_seqs: int = 8

    @property
    def token_buckets(self) -> list[int]:
        return power_of_two_buckets(min(self.min_tokens, _pow2_floor(self.max_num_batched_tokens)),
                                    self.max_num_batched_tokens)

    @property
    def seq_buckets(self) -> list[int]:
        return power_of_two_buckets(min(self.min_seqs, _pow2_floor(self.max_num_seqs)), self.max_num_seqs)

    def shape_for(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        if num_seqs > num_tokens:
            raise ValueError(f"{num_seqs} sequences cannot have only {num_tokens} tokens")
        return bucket_for(num_tokens, self.token_buckets), bucket_for(num_seqs, self.seq_buckets)


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def warmup_plan(max_num_batched_tokens: int, max_num_seqs: int, min_tokens: int = 16,
                min_seqs: int = 8) -> list[tuple[int, int]]:
    """Every (token bucket, seq bucket) a step can be padded to, smallest first: compile these at start-up and
    no request ever waits for a compilation. A pair is reachable when some real batch maps to it: the seq
    bucket must hold at least one count that fits in the token bucket (each sequence has >= 1 new token)."""
    cfg = BucketConfig(max_num_batched_tokens, max_num_seqs, min_tokens, min_seqs)
    seqs = cfg.seq_buckets
    plan = []
    for t in cfg.token_buckets:
        for i, s in enumerate(seqs):
            smallest_count = seqs[i - 1] + 1 if i else 1
            if smallest_count <= t:
                plan.append((t, s))
    return plan


def pad_tokens(t: torch.Tensor, size: int, value: float | int = 0) -> torch.Tensor:
    """Pad dim 0 of a per-token tensor (input ids, positions, hidden states) to ``size`` with ``value``."""
    extra = size - t.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad {t.shape[0]} rows down to {size}")
    if extra == 0:
        return t
    return torch.cat((t, t.new_full((extra, *t.shape[1:]), value)), dim=0)


def pad_metadata(md: AttentionMetadata, num_tokens: int, num_seqs: int,
                 max_blocks_per_seq: int | None = None) -> AttentionMetadata:
    """``md`` padded to ``num_tokens`` rows and ``num_seqs`` sequences (see the module doc for the rules)."""
    if num_tokens < md.num_tokens or num_seqs < md.num_seqs:
        raise ValueError(f"bucket ({num_tokens}, {num_seqs}) is smaller than the batch ({md.num_tokens}, "
                         f"{md.num_seqs})")
    width = md.block_tables.shape[1] if max_blocks_per_seq is None else max_blocks_per_seq
    if width < md.block_tables.shape[1]:
        raise ValueError(f"max_blocks_per_seq {width} < block table width {md.block_tables.shape[1]}")
    extra_seqs = num_seqs - md.num_seqs
    qsl = torch.cat((md.query_start_loc, md.query_start_loc[-1:].expand(extra_seqs)))
    seq_lens = torch.cat((md.seq_lens, md.seq_lens.new_zeros(extra_seqs)))
    tables = md.block_tables.new_zeros(num_seqs, width)
    tables[:md.num_seqs, :md.block_tables.shape[1]] = md.block_tables
    slots = pad_tokens(md.slot_mapping, num_tokens, -1)
    return replace(
        md, num_seqs=num_seqs, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables, slot_mapping=slots,
        query_lens_cpu=None if md.query_lens_cpu is None else md.query_lens_cpu + [0] * extra_seqs,
        seq_lens_cpu=None if md.seq_lens_cpu is None else md.seq_lens_cpu + [0] * extra_seqs,
    )


@dataclass
class PaddedBatch:
    """A step padded to its bucket, with the real sizes needed to slice the outputs back."""

    metadata: AttentionMetadata
    input_ids: torch.Tensor
    positions: torch.Tensor
    real_num_tokens: int
    real_num_seqs: int


def pad_batch(cfg: BucketConfig, md: AttentionMetadata, input_ids: torch.Tensor, positions: torch.Tensor,
              max_blocks_per_seq: int | None = None) -> PaddedBatch:
    tokens, seqs = cfg.shape_for(md.num_tokens, md.num_seqs)
    return PaddedBatch(pad_metadata(md, tokens, seqs, max_blocks_per_seq), pad_tokens(input_ids, tokens, 0),
                       pad_tokens(positions, tokens, 0), md.num_tokens, md.num_seqs)
