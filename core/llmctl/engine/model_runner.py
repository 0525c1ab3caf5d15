"""Turns the scheduler's decision into one flattened batch, runs the model once, and returns logits only for
the rows that sample (plus prompt rows whose logprobs were asked for)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from llmctl.attention import AttentionMetadata
from llmctl.engine.request import Request
from llmctl.engine.scheduler import SchedulerOutput


@dataclass
class PromptLogprobChunk:
    request: Request
    first_position: int  # prompt position whose *next* token the first row predicts
    rows: list[int]


@dataclass
class BatchInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor
    sampling_requests: list[Request]
    prompt_logprob_chunks: list[PromptLogprobChunk] = field(default_factory=list)


@dataclass
class ModelOutput:
    sample_logits: torch.Tensor  # [num_sampling_requests, vocab] float32
    prompt_logits: dict[str, tuple[PromptLogprobChunk, torch.Tensor]]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device

    def prepare(self, sched: SchedulerOutput) -> BatchInputs:
        bs = self.block_size
        ids_parts, pos_parts, slot_parts = [], [], []
        query_lens, seq_lens = [], []
        logits_rows: list[int] = []
        sampling: list[Request] = []
        prompt_chunks: list[PromptLogprobChunk] = []
        max_blocks = max(len(s.request.block_ids) for s in sched.scheduled)
        block_tables = np.zeros((len(sched.scheduled), max_blocks), dtype=np.int32)
        offset = 0
        for i, s in enumerate(sched.scheduled):
            req, n = s.request, s.num_new_tokens
            start = req.num_computed_tokens
            positions = np.arange(start, start + n, dtype=np.int64)
            table = np.asarray(req.block_ids, dtype=np.int64)
            block_tables[i, : len(table)] = table
            ids_parts.append(np.asarray(req.all_token_ids[start:start + n], dtype=np.int64))
            pos_parts.append(positions)
            slot_parts.append(table[positions // bs] * bs + positions % bs)
            query_lens.append(n)
            seq_lens.append(start + n)
            if s.samples:
                logits_rows.append(offset + n - 1)
                sampling.append(req)
            sp = req.sampling_params
            if sp.prompt_logprobs is not None and start < req.num_prompt_tokens - 1:
                last = min(start + n, req.num_prompt_tokens - 1)
                prompt_chunks.append(PromptLogprobChunk(req, start, list(range(offset, offset + last - start))))
            offset += n
        qsl = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=qsl[1:])
        dev = self.device
        metadata = AttentionMetadata(
            num_tokens=offset,
            num_seqs=len(query_lens),
            query_start_loc=torch.from_numpy(qsl).to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(block_tables).to(dev),
            slot_mapping=torch.from_numpy(np.concatenate(slot_parts)).to(dev),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=bs,
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return BatchInputs(
            input_ids=torch.from_numpy(np.concatenate(ids_parts)).to(dev),
            positions=torch.from_numpy(np.concatenate(pos_parts)).to(dev),
            metadata=metadata,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            sampling_requests=sampling,
            prompt_logprob_chunks=prompt_chunks,
        )

    @torch.inference_mode()
    def execute(self, batch: BatchInputs) -> ModelOutput:
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.metadata)
        sample_logits = self.model.compute_logits(hidden[batch.logits_indices])
        prompt_logits = {}
        for chunk in batch.prompt_logprob_chunks:
            rows = torch.tensor(chunk.rows, dtype=torch.long, device=hidden.device)
            prompt_logits[chunk.request.request_id] = (chunk, self.model.compute_logits(hidden[rows]))
        return ModelOutput(sample_logits.float(), prompt_logits)
