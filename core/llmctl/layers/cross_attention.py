"""Encoder-decoder attention over the paged KV cache (BART).

One KV layout per decoder layer: a sequence's blocks ``[0, E_pad)`` hold that layer's cross-attention keys/values
(``E`` encoder tokens, padded to a block boundary), the blocks after them its decoder self-attention keys/values.
The runner sees one flat prompt (encoder ids, padding, the decoder start token), so scheduling, block allocation,
preemption and prefix caching work unchanged; this module splits a step's metadata into the two views the
decoder needs:

* self-attention: the decoder rows, each sequence's block table sliced past ``E_pad`` and its length minus
  ``E_pad`` (the slots stay the absolute ones the runner computed);
* cross-attention: every decoder row as its own one-query sequence of length ``E`` over the encoder blocks, with
  slot ``-1`` and no new keys, which any backend handles: a one-query sequence is causal and full at once.

The encoder of a sequence runs in the step whose chunk covers its first ``E_pad`` positions (the scheduler never
splits them); its cross keys/values are written into the slots of positions ``0..E-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.attention import AttentionMetadata, build_attention_metadata
from llmctl.plugins.types import AttentionBackend


def padded_encoder_len(encoder_len: int, block_size: int) -> int:
    return -(-encoder_len // block_size) * block_size


@dataclass
class EncoderRun:
    """One sequence whose encoder runs this step: batch rows ``start:start + length`` hold its encoder ids."""

    start: int
    length: int


@dataclass
class EncoderDecoderStep:
    encoder_runs: list[EncoderRun]
    decoder_rows: torch.Tensor  # [D] long, the batch rows that are decoder tokens
    decoder_positions: torch.Tensor  # [D] long, positions within the decoder (0 = the start token)
    self_metadata: AttentionMetadata | None  # None when the step has no decoder rows
    cross_metadata: AttentionMetadata | None


def split_step(metadata: AttentionMetadata, positions: torch.Tensor, encoder_lens: list[int],
               block_size: int) -> EncoderDecoderStep:
    """The encoder runs and the two decoder attention views of one flattened step (see the module docstring)."""
    q_lens = metadata.query_lens_cpu
    s_lens = metadata.seq_lens_cpu
    if q_lens is None or s_lens is None:
        q_lens, s_lens = metadata.query_lens.tolist(), metadata.seq_lens.tolist()
    if len(encoder_lens) != len(q_lens):
        raise ValueError(f"encoder_lens: {len(encoder_lens)} lengths for {len(q_lens)} sequences")
    device = metadata.slot_mapping.device
    tables = metadata.block_tables
    runs: list[EncoderRun] = []
    rows: list[int] = []
    offsets: list[int] = []  # decoder position of each decoder row's first token, per sequence
    self_q, self_s, self_tables, cross_s, cross_seq = [], [], [], [], []
    row = 0
    for i, (q, s, enc) in enumerate(zip(q_lens, s_lens, encoder_lens, strict=True)):
        e_pad = padded_encoder_len(enc, block_size)
        start = s - q
        first = row
        if start < e_pad:
            if start != 0 or s < e_pad:
                raise ValueError(f"encoder-decoder: sequence {i} computes positions {start}..{s - 1}, which split its "
                                 f"encoder input of {e_pad} padded positions")
            runs.append(EncoderRun(row, enc))
            first = row + e_pad
        n_dec = row + q - first
        if n_dec > 0:
            rows.extend(range(first, row + q))
            offsets.append(e_pad)
            self_q.append(n_dec)
            self_s.append(s - e_pad)
            self_tables.append(tables[i, e_pad // block_size:])
            cross_s.extend([enc] * n_dec)
            cross_seq.extend([i] * n_dec)
        row += q
    if not rows:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return EncoderDecoderStep(runs, empty, empty, None, None)
    dec_rows = torch.tensor(rows, dtype=torch.long, device=device)
    shift = torch.tensor([o for o, n in zip(offsets, self_q, strict=True) for _ in range(n)], dtype=torch.long,
                         device=device)
    dec_positions = positions[dec_rows] - shift
    width = max(t.shape[0] for t in self_tables)
    self_table = torch.zeros((len(self_tables), max(width, 1)), dtype=tables.dtype, device=tables.device)
    for j, t in enumerate(self_tables):
        self_table[j, :t.shape[0]] = t
    self_md = build_attention_metadata(self_q, self_s, self_table, metadata.slot_mapping[dec_rows], block_size,
                                       device)
    cross_table = tables[torch.tensor(cross_seq, dtype=torch.long, device=tables.device)]
    cross_md = build_attention_metadata([1] * len(rows), cross_s, cross_table,
                                        torch.full((len(rows),), -1, dtype=torch.long), block_size, device)
    return EncoderDecoderStep(runs, dec_rows, dec_positions, self_md, cross_md)


def cross_attend(backend: AttentionBackend, query: torch.Tensor, kv_cache: torch.Tensor,
                 metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """``query`` [D, H, Dh] of decoder rows over their encoder's cached keys/values -> [D, H * Dh]. Nothing is
    written: the keys/values were stored when the encoder ran."""
    out = backend.forward(query, kv_cache, metadata, scale, None, key=None, value=None)
    return out.reshape(out.shape[0], -1)
