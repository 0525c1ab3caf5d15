"""Turns core outputs (token ids, logprobs) into ``RequestOutput``s: detokenizes, applies stop strings,
gathers the n samples of a request, and keeps per-request timing.

A failure while processing one request (e.g. the detokenizer raising) ends that request only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from llmctl.engine.detokenizer import IncrementalDetokenizer
from llmctl.engine.sampler import RowLogprobs
from llmctl.engine.step_output import CoreOutput
from llmctl.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from llmctl.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class SequenceState:
    index: int
    request_id: str
    params: SamplingParams
    detok: IncrementalDetokenizer
    logprobs: list[PositionLogprobs] | None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[SequenceState]
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, tuple[ParentState, SequenceState]] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
            child_ids: list[str], arrival_time: float) -> None:
        seqs = [SequenceState(i, cid, params, IncrementalDetokenizer(self.tokenizer, params),
                              [] if params.logprobs is not None else None) for i, cid in enumerate(child_ids)]
        parent = ParentState(request_id, prompt, prompt_token_ids, params, seqs, RequestMetrics(arrival_time),
                             prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        self.parents[request_id] = parent
        for s in seqs:
            self.child_to_parent[s.request_id] = (parent, s)

    def has(self, request_id: str) -> bool:
        return request_id in self.parents

    def child_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        return [s.request_id for s in parent.sequences] if parent else []

    def abort(self, request_id: str, reason: str = "abort") -> RequestOutput | None:
        parent = self.parents.get(request_id)
        if parent is None:
            return None
        for s in parent.sequences:
            if not s.finished:
                s.finish_reason = reason
        return self._finish(parent)

    def _decode(self, ids: list[int]) -> list[str]:
        return self.tokenizer.batch_decode([[i] for i in ids])

    def _position_logprobs(self, row: RowLogprobs, token: int) -> PositionLogprobs:
        ids = [token] + [t for t in row.top_ids if t != token]
        texts = self._decode(ids)
        out: PositionLogprobs = {token: Logprob(row.sampled_logprob, row.sampled_rank, texts[0])}
        for rank, (tid, lp) in enumerate(zip(row.top_ids, row.top_logprobs), start=1):
            if tid != token:
                out[tid] = Logprob(lp, rank, texts[ids.index(tid)])
        return out

    def process(self, core_outputs: list[CoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the updated request outputs and the child ids the core must stop (stop string or error)."""
        now = time.time()
        touched: dict[str, ParentState] = {}
        to_stop: list[str] = []
        for co in core_outputs:
            entry = self.child_to_parent.get(co.request_id)
            if entry is None:
                continue
            parent, seq = entry
            touched[parent.request_id] = parent
            try:
                self._apply(parent, seq, co, now)
            except Exception as exc:  # this request's own failure; the others go on
                logger.exception("processing output of request %s failed", co.request_id)
                seq.finish_reason, seq.error = "error", f"{type(exc).__name__}: {exc}"
                to_stop.append(seq.request_id)
                continue
            if seq.finished and co.finish_reason is None:
                to_stop.append(seq.request_id)
        results = []
        for parent in touched.values():
            if parent.finished:
                results.append(self._finish(parent))
            else:
                results.append(self._snapshot(parent, finished=False))
        return results, to_stop

    def _apply(self, parent: ParentState, seq: SequenceState, co: CoreOutput, now: float) -> None:
        m = parent.metrics
        parent.num_cached_tokens = co.num_cached_tokens
        if m.first_scheduled_time is None and co.first_scheduled_time is not None:
            m.first_scheduled_time = co.first_scheduled_time
        if co.prompt_logprobs is not None and parent.prompt_logprobs is not None:
            start = co.prompt_logprobs_start
            plp = parent.prompt_logprobs
            while len(plp) < start + len(co.prompt_logprobs):
                plp.append(None)
            for j, row in enumerate(co.prompt_logprobs):
                token = parent.prompt_token_ids[start + j]
                plp[start + j] = self._position_logprobs(row, token)
        if co.new_token_ids:
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            if co.new_logprobs is not None and seq.logprobs is not None:
                for row, token in zip(co.new_logprobs, co.new_token_ids):
                    seq.logprobs.append(self._position_logprobs(row, token))
                    seq.cumulative_logprob += row.sampled_logprob
            matched = seq.detok.add_tokens(co.new_token_ids)
            if matched is not None and co.finish_reason is None:
                seq.finish_reason, seq.stop_reason = "stop", matched
        if co.finish_reason is not None and seq.finish_reason is None:
            seq.finish_reason, seq.stop_reason, seq.error = co.finish_reason, co.stop_reason, co.error
            if co.finish_reason != "error":
                seq.detok.finalize()

    def _snapshot(self, parent: ParentState, finished: bool) -> RequestOutput:
        outs = []
        for s in parent.sequences:
            outs.append(CompletionOutput(
                index=s.index,
                text=s.detok.visible_text(s.finished),
                token_ids=list(s.detok.token_ids),
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            ))
        errors = [s.error for s in parent.sequences if s.error]
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=list(parent.prompt_logprobs) if parent.prompt_logprobs is not None else None,
            outputs=outs,
            finished=finished,
            metrics=parent.metrics,
            error=errors[0] if errors else None,
            num_cached_tokens=parent.num_cached_tokens,
        )

    def _finish(self, parent: ParentState) -> RequestOutput:
        parent.metrics.finished_time = time.time()
        self.parents.pop(parent.request_id, None)
        for s in parent.sequences:
            self.child_to_parent.pop(s.request_id, None)
        return self._snapshot(parent, finished=True)
