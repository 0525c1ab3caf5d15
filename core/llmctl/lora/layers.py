"""Device slots of the LoRA weights for one projection, and the per-step mapping of tokens to slots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmctl.lora.adapter import LoRAAdapter


@dataclass
class LoRABatch:
    """Which slot each token of this step reads (-1: the base model), and the slots in use (at most max_loras)."""

    token_slots: torch.Tensor  # int64 [num_tokens]
    active_slots: tuple[int, ...]


class StepMapping:
    """The current step's :class:`LoRABatch`, shared by every LoRA layer of one engine (set by the model runner
    before each forward, so layers need no extra argument and the models no change).

    ``logits`` maps the rows of one ``compute_logits`` call instead: those rows are a selection of the step's
    tokens (the sampled positions, or one request's prompt-logprob slice), so the LM head's adapters need their
    own mapping, set only around that call (:meth:`llmctl.lora.manager.LoRAManager.logits_rows`)."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None
        self.logits: LoRABatch | None = None


@dataclass(frozen=True)
class Shard:
    """One checkpoint projection inside a (merged) layer: its name and its output columns."""

    name: str
    offset: int
    width: int


class LoRALinearSlots:
    """``A`` [max_loras, max_rank, in] and ``B`` transposed, [max_loras, max_rank, width], per shard (so the expand
    reads each rank row of B along the output columns, contiguous). A slot's unused rank rows stay zero, which adds
    exact zeros, so adapters of any rank up to max_rank share the buffers. Each shard also keeps every slot's real
    rank (0 where the slot's adapter does not target it): kernels skip the padded part, and a shard that no active
    adapter targets is not run at all."""

    def __init__(self, shards: list[Shard], in_features: int, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, mapping: StepMapping, op: Callable[..., None], *,
                 on_logits: bool = False) -> None:
        self.shards = shards
        self.mapping = mapping
        self.op = op
        self.on_logits = on_logits  # the LM head: its rows are the logits rows, not the step's tokens
        self.a = [torch.zeros(max_loras, max_rank, in_features, dtype=dtype, device=device) for _ in shards]
        self.b = [torch.zeros(max_loras, max_rank, s.width, dtype=dtype, device=device) for s in shards]
        self.ranks = [torch.zeros(max_loras, dtype=torch.int32, device=device) for _ in shards]
        self._host_ranks = [[0] * max_loras for _ in shards]

    def set_slot(self, slot: int, adapter: LoRAAdapter | None) -> None:
        for i, (shard, a, b) in enumerate(zip(self.shards, self.a, self.b, strict=True)):
            a[slot].zero_()
            b[slot].zero_()
            found = None if adapter is None else adapter.weights.get(shard.name)
            rank = 0
            if found is not None:
                wa, wb = found
                a[slot, : wa.shape[0]].copy_(wa)
                b[slot, : wb.shape[1]].copy_(wb.t())
                rank = wa.shape[0]
            self.ranks[i][slot] = rank
            self._host_ranks[i][slot] = rank

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # The LM head outside a mapped logits call runs the base head: every sampled token's logits are mapped.
        batch = self.mapping.logits if self.on_logits else self.mapping.batch
        if batch is None or not batch.active_slots:
            return y
        rows_x = x.reshape(-1, x.shape[-1])
        rows_y = y.view(-1, y.shape[-1])
        if batch.token_slots.shape[0] != rows_x.shape[0]:
            raise RuntimeError(f"LoRA: {rows_x.shape[0]} rows but the step maps {batch.token_slots.shape[0]} "
                               "to adapter slots")
        for i, (shard, a, b) in enumerate(zip(self.shards, self.a, self.b, strict=True)):
            host_ranks = self._host_ranks[i]
            if not any(host_ranks[s] for s in batch.active_slots):
                continue  # no adapter of this step targets this projection
            self.op(rows_x, rows_y[:, shard.offset: shard.offset + shard.width], a, b, batch.token_slots,
                    batch.active_slots, self.ranks[i])
        return y


class LoRAEmbeddingSlots:
    """The token embedding's adapters: ``A`` [max_loras, vocab, max_rank] (rows looked up by token id) and
    ``B`` [max_loras, hidden, max_rank]."""

    def __init__(self, name: str, vocab: int, hidden: int, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, mapping: StepMapping) -> None:
        self.name = name
        self.mapping = mapping
        self.a = torch.zeros(max_loras, vocab, max_rank, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras, hidden, max_rank, dtype=dtype, device=device)

    def set_slot(self, slot: int, adapter: LoRAAdapter | None) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        found = None if adapter is None else adapter.weights.get(self.name)
        if found is not None:
            wa, wb = found
            self.a[slot, :, : wa.shape[1]].copy_(wa)
            self.b[slot, :, : wb.shape[1]].copy_(wb)

    def add(self, input_ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = self.mapping.batch
        if batch is None or not batch.active_slots:
            return y
        for slot in batch.active_slots:
            rows = (batch.token_slots == slot).nonzero().squeeze(1)
            shrunk = self.a[slot][input_ids[rows]]
            y.index_add_(0, rows, shrunk @ self.b[slot].t())
        return y
