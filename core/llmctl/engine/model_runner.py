"""Turns the scheduler's decision into one flattened batch, runs the model once, and returns logits only for
the rows that sample (plus prompt rows whose logprobs were asked for).

All-decode batches can instead replay a graph the platform captured (``Platform.decode_step_runner``): the
runner describes the step against static buffers (:meth:`ModelRunner.decode_graph_spec`) and, per step, hands
the live tensors to the platform's runner, which pads the batch up to a captured size.

A speculative verification step (each sequence's last token plus its drafts) is laid out the same way: one row
per token, each row a decode over its own prefix (the sequence's block table repeated, ``seq_len`` = position + 1).
Every layer writes the step's keys before any row attends, so row ``j`` sees the drafts before it, and the step
replays the captured decode graph instead of running eagerly through the prefill path.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmctl.attention import AttentionMetadata, build_attention_metadata
from llmctl.engine.request import Request
from llmctl.engine.scheduler import SchedulerOutput
from llmctl.multimodal.encoder_cache import EncoderCache
from llmctl.multimodal.inputs import MultiModalFeature
from llmctl.plugins.types import DecodeGraphSpec, DecodeStepRunner, Platform

if TYPE_CHECKING:
    from llmctl.lora.manager import LoRAManager

# Decode batches above this run eagerly: their launch overhead is small next to the work, and every captured
# size costs capture time and graph memory.
MAX_GRAPH_BATCH = 512


def decode_graph_batch_sizes(max_num_seqs: int, limit: int = MAX_GRAPH_BATCH) -> tuple[int, ...]:
    """1, 2, 4, 8, then every multiple of 8, up to ``max_num_seqs`` (itself included): a live batch wastes at
    most 7 padded rows while the number of graphs stays linear in the batch limit."""
    top = min(max_num_seqs, limit)
    sizes = {b for b in (1, 2, 4) if b <= top} | set(range(8, top + 1, 8)) | {top}
    return tuple(sorted(sizes))


def _pad_decode_rows(views: Mapping[str, torch.Tensor], n: int, batch: int) -> None:
    """Rows ``n..batch`` become empty sequences: slot -1 (no KV write), length 0 (no keys to read, so a zero
    attention output). ``query_start_loc`` stays ``arange``: every row, real or padded, is one query token."""
    if n >= batch:
        return
    views["input_ids"][n:].zero_()
    views["positions"][n:].zero_()
    views["slot_mapping"][n:].fill_(-1)
    views["seq_lens"][n:].zero_()
    views["block_tables"][n:].zero_()


@dataclass
class PromptLogprobChunk:
    request: Request
    first_position: int  # prompt position whose *next* token the first row predicts
    rows: list[int]


@dataclass
class PoolingChunk:
    """A pooling request's rows in the flattened batch: its whole prompt (never chunked)."""

    request: Request
    start: int
    end: int


@dataclass
class MMSlice:
    """Rows ``lo:hi`` of an image's encoder output go to batch rows ``row:row + hi - lo``: a prefill chunk may
    hold a whole placeholder run or any part of one (chunked prefill, or a prefix-cache hit that ends inside it)."""

    row: int
    feature: MultiModalFeature
    lo: int
    hi: int


@dataclass
class BatchInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor
    sampling_requests: list[Request]
    prompt_logprob_chunks: list[PromptLogprobChunk] = field(default_factory=list)
    pooling_chunks: list[PoolingChunk] = field(default_factory=list)
    token_type_ids: torch.Tensor | None = None  # [num_tokens], only when a pooling request carries segment ids
    # Per sampling request, the draft tokens it feeds; its logits rows are then len(draft) + 1 consecutive rows
    # (one per draft position plus the bonus position). Empty when nothing in the batch speculates.
    draft_token_ids: list[list[int]] = field(default_factory=list)
    mm_slices: list[MMSlice] = field(default_factory=list)  # image rows to merge over the token embeddings
    # Per scheduled request, (first position, tokens) of its chunk when the step is laid out one row per token
    # (a flattened verification step): the metadata then describes rows, not requests.
    flat_chunks: list[tuple[int, int]] | None = None
    encoder_lens: list[int] | None = None  # per sequence, for an encoder-decoder model (layers/cross_attention.py)


@dataclass
class ModelOutput:
    sample_logits: torch.Tensor  # [num_sampling_rows, vocab], the model's dtype (one row per request without
    # draft tokens, len(draft) + 1 rows with them)
    # Hidden states of each prompt-logprobs chunk's rows, not logits: a long prompt's logits (rows x vocab, float32)
    # would cost GiBs at once, so they are computed a slice at a time (sampler.prompt_logprobs_in_slices).
    prompt_hidden: dict[str, tuple[PromptLogprobChunk, torch.Tensor]]
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)  # request id -> the pooler's output
    hidden: torch.Tensor | None = None  # every row's final (or EAGLE-3's auxiliary) hidden state, when keep_hidden


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device, lora: LoRAManager | None = None) -> None:
        self.model = model
        self.lora = lora
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.decode_runner: DecodeStepRunner | None = None
        self._graph_table_width = 0
        self.keep_hidden = False
        # With keep_hidden: the rows kept are the target's auxiliary hidden states (EAGLE-3) instead of its final
        # ones. A captured decode step does not produce them, so such steps run eagerly.
        self.keep_aux_hidden = False
        # Chunks of up to this many tokens that end a request's known tokens (speculation sets 1 + its drafts)
        # are laid out one row per token, as decodes; 1 leaves every multi-token chunk to the general path.
        self.max_flat_query_len = 1
        self.encoder_cache = EncoderCache() if getattr(model, "supports_multimodal", False) else None
        # M-RoPE (Qwen2-VL): prefill chunks get [3, T] positions; decodes their index plus the request's delta
        self.uses_mrope = bool(getattr(model, "uses_mrope", False))
        # Encoder-decoder (BART): every step takes the general path and tells the model each encoder's length
        self.encoder_decoder = bool(getattr(model, "is_encoder_decoder", False))

    @torch.inference_mode()
    def decode_graph_spec(self, batch_sizes: tuple[int, ...], max_model_len: int) -> DecodeGraphSpec:
        """The all-decode step against static buffers for ``max(batch_sizes)`` sequences.

        The metadata's host fields are what a capture bakes in, so they are either exact for every replay of a
        size (``num_seqs``, ``num_tokens``, ``max_query_len`` = 1) or the worst case (``max_seq_len`` =
        ``max_model_len``, which only ever over-sizes a kernel grid); real lengths reach the kernels through
        the ``seq_lens`` tensor. Buffers are made under ``inference_mode`` because every later use is.
        """
        max_batch = max(batch_sizes)
        width = -(-max_model_len // self.block_size)
        self._graph_table_width = width
        dev = self.device
        static = {
            "input_ids": torch.zeros(max_batch, dtype=torch.int64, device=dev),
            "positions": torch.zeros(max_batch, dtype=torch.int64, device=dev),
            "slot_mapping": torch.full((max_batch,), -1, dtype=torch.int64, device=dev),
            "seq_lens": torch.zeros(max_batch, dtype=torch.int32, device=dev),
            "block_tables": torch.zeros((max_batch, width), dtype=torch.int32, device=dev),
            "query_start_loc": torch.arange(max_batch + 1, dtype=torch.int32, device=dev),
        }
        block_size = self.block_size

        def forward(input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor) -> torch.Tensor:
            batch = input_ids.shape[0]
            metadata = build_attention_metadata([1] * batch, seq_lens, block_tables, slot_mapping, block_size,
                                                dev, query_start_loc=query_start_loc, max_seq_len=max_model_len)
            return self.model(input_ids, positions, self.kv_caches, metadata)

        return DecodeGraphSpec(forward=forward, static_inputs=static, batch_sizes=tuple(sorted(batch_sizes)),
                               extra_rows={"query_start_loc": 1}, pad_fn=_pad_decode_rows)

    def capture_decode_graphs(self, platform: Platform, max_rows: int, max_model_len: int) -> str:
        """Ask the platform for a decode-step runner over up to ``max_rows`` rows and capture it now that the KV
        cache exists; the returned words go into the start-up log so a user sees why steps run eagerly."""
        sizes = decode_graph_batch_sizes(max_rows)
        spec = self.decode_graph_spec(sizes, max_model_len)
        runner = platform.decode_step_runner(spec)
        if runner is None:
            return f"off (platform {platform.name} has none)"
        if not isinstance(runner, DecodeStepRunner):
            raise TypeError(f"platform {platform.name}: decode_step_runner returned {type(runner).__name__}, "
                            f"which lacks capture/padded_size/run")
        try:
            with torch.inference_mode():
                runner.capture()
        except Exception as exc:
            raise RuntimeError(f"enforce_eager: capturing decode graphs failed ({type(exc).__name__}: {exc}); start "
                               f"with enforce_eager=True (llmctl serve --enforce-eager) to run without them") from exc
        captured = sorted({p for p in map(runner.padded_size, sizes) if p is not None})
        if not captured:
            why = getattr(runner, "reason", None)  # optional: a runner may say why it captured nothing
            return f"off (platform {platform.name} captured no batch size{': ' + why if why else ''})"
        self.decode_runner = runner
        return f"on (batch sizes {captured[0]}..{captured[-1]}, larger decode batches eager)"

    def prepare(self, sched: SchedulerOutput) -> BatchInputs:
        if self.lora is not None:
            self.lora.begin_step([s.request.lora for s in sched.scheduled],
                                 [s.num_new_tokens for s in sched.scheduled], self.device)
        flat = self.max_flat_query_len
        if not self.encoder_decoder and all(
                s.num_new_tokens <= flat and s.samples and s.request.sampling_params.prompt_logprobs is None
                and s.request.pooling_params is None and not _in_images(s.request) for s in sched.scheduled):
            if all(s.num_new_tokens == 1 for s in sched.scheduled):
                return self._prepare_decodes(sched)
            return self._prepare_flat(sched)
        return self._prepare_general(sched)

    def _prepare_general(self, sched: SchedulerOutput) -> BatchInputs:
        bs = self.block_size
        ids_parts, pos_parts, slot_parts = [], [], []
        query_lens, seq_lens = [], []
        logits_rows: list[int] = []
        sampling: list[Request] = []
        drafts: list[list[int]] = []
        prompt_chunks: list[PromptLogprobChunk] = []
        pooling_chunks: list[PoolingChunk] = []
        mm_slices: list[MMSlice] = []
        max_blocks = max(len(s.request.block_ids) for s in sched.scheduled)
        block_tables = np.zeros((len(sched.scheduled), max_blocks), dtype=np.int32)
        offset = 0
        for i, s in enumerate(sched.scheduled):
            req, n = s.request, s.num_new_tokens
            start = req.num_computed_tokens
            positions = np.arange(start, start + n, dtype=np.int64)
            table = np.asarray(req.block_ids, dtype=np.int64)
            block_tables[i, : len(table)] = table
            known = req.all_token_ids[start:start + n]
            ids_parts.append(np.asarray(known + s.spec_token_ids if s.spec_token_ids else known, dtype=np.int64))
            pos_parts.append(self._mrope_rows(req, positions) if self.uses_mrope else positions)
            slot_parts.append(table[positions // bs] * bs + positions % bs)
            query_lens.append(n)
            seq_lens.append(start + n)
            for f in req.mm_features:
                lo, hi = max(start, f.offset), min(start + n, f.end)
                if lo < hi:
                    mm_slices.append(MMSlice(offset + lo - start, f, lo - f.offset, hi - f.offset))
            if req.pooling_params is not None:
                pooling_chunks.append(PoolingChunk(req, offset, offset + n))
            elif s.samples:
                k = len(s.spec_token_ids)
                logits_rows.extend(range(offset + n - 1 - k, offset + n))
                sampling.append(req)
                drafts.append(s.spec_token_ids)
            sp = req.sampling_params
            if sp.prompt_logprobs is not None and start < req.num_prompt_tokens - 1:
                last = min(start + n, req.num_prompt_tokens - 1)
                prompt_chunks.append(PromptLogprobChunk(req, start, list(range(offset, offset + last - start))))
            offset += n
        dev = self.device
        metadata = build_attention_metadata(query_lens, seq_lens, torch.from_numpy(block_tables),
                                            torch.from_numpy(np.concatenate(slot_parts)), bs, dev)
        return BatchInputs(
            input_ids=torch.from_numpy(np.concatenate(ids_parts)).to(dev),
            positions=torch.from_numpy(np.concatenate(pos_parts, axis=-1)).to(dev),
            metadata=metadata,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            sampling_requests=sampling,
            prompt_logprob_chunks=prompt_chunks,
            pooling_chunks=pooling_chunks,
            token_type_ids=_token_type_ids(sched, dev) if pooling_chunks else None,
            draft_token_ids=drafts if any(drafts) else [],
            mm_slices=mm_slices,
            encoder_lens=[s.request.encoder_len for s in sched.scheduled] if self.encoder_decoder else None,
        )

    def _prepare_decodes(self, sched: SchedulerOutput) -> BatchInputs:
        """The all-decode step (most steps): plain lists per request and one tensor per input instead of a few
        numpy arrays per request (about half the preparation time; docs/performance.md). The same inputs as
        the general path; a test compares them on every decode step of a preempting, chunking run."""
        bs = self.block_size
        reqs = [s.request for s in sched.scheduled]
        n = len(reqs)
        pos = [r.num_computed_tokens for r in reqs]
        ids = [r.all_token_ids[p] for r, p in zip(reqs, pos, strict=True)]
        rope_pos = [p + self._mrope_delta(r) for r, p in zip(reqs, pos, strict=True)] if self.uses_mrope else pos
        slots = [r.block_ids[p // bs] * bs + p % bs for r, p in zip(reqs, pos, strict=True)]
        seq_lens = [p + 1 for p in pos]
        width = max(len(r.block_ids) for r in reqs)
        block_tables = np.zeros((n, width), dtype=np.int32)
        for i, r in enumerate(reqs):
            block_tables[i, : len(r.block_ids)] = r.block_ids
        dev = self.device
        metadata = build_attention_metadata([1] * n, seq_lens, torch.from_numpy(block_tables),
                                            torch.tensor(slots, dtype=torch.int64), bs, dev)
        return BatchInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(rope_pos, dtype=torch.int64, device=dev),
            metadata=metadata,
            logits_indices=torch.arange(n, dtype=torch.long).to(dev),
            sampling_requests=reqs,
            prompt_logprob_chunks=[],
        )

    def _mrope_delta(self, req: Request) -> int:
        """The request's M-RoPE shift, computed with its prompt positions the first time it is needed."""
        if req.mrope_positions is None and req.mm_features:
            req.mrope_positions, req.mrope_position_delta = self.model.mrope_positions(req.mm_features,
                                                                                       req.num_prompt_tokens)
        return req.mrope_position_delta

    def _mrope_rows(self, req: Request, positions: np.ndarray) -> np.ndarray:
        """[3, n] M-RoPE positions of a chunk: the prompt's own rows where the chunk lies in the prompt, the token
        index plus the request's delta on all three rows after it (generated tokens, drafts) and for text-only
        requests."""
        delta = self._mrope_delta(req)
        rows = np.broadcast_to(positions + delta, (3, positions.shape[0])).copy()
        prompt = req.mrope_positions
        if prompt is not None:
            start, end = int(positions[0]), min(int(positions[-1]) + 1, prompt.shape[1])
            if start < end:
                rows[:, :end - start] = prompt[:, start:end]
        return rows

    def _prepare_flat(self, sched: SchedulerOutput) -> BatchInputs:
        """Short chunks that end each request's tokens (a verification step: the last token plus the drafts; a
        draft model catching up on accepted tokens), one decode row per token: the tokens, logits and hidden
        states come out in the general path's order, and the step can replay the captured decode graph."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        counts: list[int] = []
        logits_rows: list[int] = []
        chunks: list[tuple[int, int]] = []
        drafts: list[list[int]] = []
        reqs = [s.request for s in sched.scheduled]
        for s in sched.scheduled:
            req, n, spec = s.request, s.num_new_tokens, s.spec_token_ids
            start = req.num_computed_tokens
            known = req.all_token_ids[start:start + n - len(spec)]
            ids.extend(known + spec if spec else known)
            table = req.block_ids
            for p in range(start, start + n):
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            counts.append(n)
            logits_rows.extend(range(len(ids) - 1 - len(spec), len(ids)))
            chunks.append((start, n))
            drafts.append(spec)
        width = max(len(r.block_ids) for r in reqs)
        tables = np.zeros((len(reqs), width), dtype=np.int32)
        for i, r in enumerate(reqs):
            tables[i, : len(r.block_ids)] = r.block_ids
        rows = len(ids)
        dev = self.device
        rope_pos = pos
        if self.uses_mrope:  # rows past a request's images, as decodes: the index plus the request's delta
            rope_pos = [p + d for p, d in zip(pos, np.repeat([self._mrope_delta(r) for r in reqs], counts).tolist(),
                                              strict=True)]
        metadata = build_attention_metadata([1] * rows, [p + 1 for p in pos],
                                            torch.from_numpy(np.repeat(tables, counts, axis=0)),
                                            torch.tensor(slots, dtype=torch.int64), bs, dev)
        return BatchInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(rope_pos, dtype=torch.int64, device=dev),
            metadata=metadata,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            sampling_requests=reqs,
            prompt_logprob_chunks=[],
            draft_token_ids=drafts if any(drafts) else [],
            flat_chunks=chunks,
        )

    def _replay_decode(self, batch: BatchInputs) -> torch.Tensor | None:
        """Hidden states from the platform's captured decode step, or ``None`` when this batch must run eagerly
        (a prefill chunk in it, or more sequences than the largest captured size)."""
        runner, md = self.decode_runner, batch.metadata
        if runner is None or self.keep_aux_hidden or md.max_query_len != 1 or runner.padded_size(md.num_seqs) is None:
            return None
        if md.block_tables.shape[1] > self._graph_table_width:  # cannot happen within max_model_len; stay correct
            return None
        return runner.run(input_ids=batch.input_ids, positions=batch.positions, slot_mapping=md.slot_mapping,
                          seq_lens=md.seq_lens, block_tables=md.block_tables)

    @torch.inference_mode()
    def execute(self, batch: BatchInputs) -> ModelOutput:
        return self.finish(batch, self.forward(batch))

    @torch.inference_mode()
    def forward(self, batch: BatchInputs) -> torch.Tensor:
        """The model's layers on this batch (this stage's, under pipeline parallelism): its hidden states."""
        hidden = None if batch.mm_slices or self.encoder_decoder else self._replay_decode(batch)
        if hidden is None:
            extra = {} if batch.token_type_ids is None else {"token_type_ids": batch.token_type_ids}
            if batch.encoder_lens is not None:
                extra["encoder_lens"] = batch.encoder_lens
            if batch.mm_slices:
                extra["inputs_embeds"] = self._merged_embeddings(batch)
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.metadata, **extra)
        return hidden

    @torch.inference_mode()
    def finish(self, batch: BatchInputs, hidden: torch.Tensor) -> ModelOutput:
        """Pooling, the sampled rows' logits (every pipeline stage gets the last stage's) and what is kept."""
        if batch.pooling_chunks:
            pooled = self._pool(hidden, batch.pooling_chunks)
            if not batch.sampling_requests and not batch.prompt_logprob_chunks:
                return ModelOutput(hidden.new_empty(0), {}, pooled)
        else:
            pooled = {}
        with self.lora.logits_rows(batch.logits_indices) if self.lora is not None else nullcontext():
            sample_logits = self.model.compute_logits(hidden[batch.logits_indices])
        prompt_hidden = {}
        for chunk in batch.prompt_logprob_chunks:
            rows = torch.tensor(chunk.rows, dtype=torch.long, device=hidden.device)
            prompt_hidden[chunk.request.request_id] = (chunk, hidden[rows])
        # the sampler casts to float32 where it needs to
        kept = None
        if self.keep_hidden:
            kept = self.model.model.aux_hidden_states if self.keep_aux_hidden else hidden
        return ModelOutput(sample_logits, prompt_hidden, pooled, kept)

    def _merged_embeddings(self, batch: BatchInputs) -> torch.Tensor:
        """Token embeddings with each image's rows written over its placeholders. Images not in the encoder cache
        are encoded together, in one call of the vision tower."""
        assert self.encoder_cache is not None
        cache = self.encoder_cache
        outputs: dict[bytes, torch.Tensor] = {}
        todo: dict[bytes, MultiModalFeature] = {}
        for s in batch.mm_slices:
            key = s.feature.mm_hash
            if key in outputs or key in todo:
                continue
            found = cache.get(key)
            if found is None:
                todo[key] = s.feature
            else:
                outputs[key] = found
        if todo:
            encoded = self.model.embed_multimodal(list(todo.values()))
            for key, rows in zip(todo, encoded, strict=True):
                f = todo[key]
                if rows.shape[0] != f.length:
                    raise ValueError(f"multi_modal_data: an image encoded to {rows.shape[0]} rows for a placeholder "
                                     f"run of {f.length}")
                outputs[key] = rows if len(todo) == 1 else rows.clone()  # a view would keep the whole batch alive
                cache.put(key, outputs[key])
        embeds = self.model.embed_input_ids(batch.input_ids)
        for s in batch.mm_slices:
            embeds[s.row:s.row + s.hi - s.lo] = outputs[s.feature.mm_hash][s.lo:s.hi].to(embeds.dtype)
        return embeds

    def _pool(self, hidden: torch.Tensor, chunks: list[PoolingChunk]) -> dict[str, torch.Tensor]:
        """The model's pooler over each pooling request's rows, in one call (a classifier head runs batched).
        Results come back on the host, as callers read them there."""
        rows = [hidden[c.start:c.end] for c in chunks]
        images = [i for i, c in enumerate(chunks) if c.request.pixel_values is not None]
        if images:  # an image request's placeholder row is replaced by its image embedding, pooled the same way
            pixels = torch.stack([chunks[i].request.pixel_values for i in images]).to(hidden.device)
            embedded = self.model.embed_images(pixels)
            for j, i in enumerate(images):
                rows[i] = embedded[j:j + 1]
        results = self.model.pooler(rows, [c.request.pooling_params for c in chunks])
        return {c.request.request_id: r.cpu() for c, r in zip(chunks, results, strict=True)}


def _in_images(request: Request) -> bool:
    """Whether the request's next tokens may include image placeholders (its prompt is not computed yet)."""
    return bool(request.mm_features) and request.num_computed_tokens < request.num_prompt_tokens


def _token_type_ids(sched: SchedulerOutput, device: torch.device) -> torch.Tensor | None:
    """Segment ids for the whole batch (0 for tokens of requests without any), or ``None`` when no request has
    them, so models fall back to their first segment without a tensor per step."""
    if not any(s.request.token_type_ids for s in sched.scheduled):
        return None
    parts = []
    for s in sched.scheduled:
        req, start = s.request, s.request.num_computed_tokens
        types = req.token_type_ids or []
        part = types[start:start + s.num_new_tokens]
        parts.extend(part + [0] * (s.num_new_tokens - len(part)))
    return torch.tensor(parts, dtype=torch.int64, device=device)
