"""Decides what runs each step: continuous batching under a token budget, chunked prefill, FCFS admission,
preemption by recompute of the newest request when KV blocks run out."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from llmctl.config import SchedulerConfig
from llmctl.engine.encoder_decoder import encoder_chunk_ok, usable_prefix
from llmctl.engine.request import Request, RequestStatus
from llmctl.kv.manager import KVCacheManager


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    # Draft tokens fed after the request's known tokens (counted in num_new_tokens), to be verified this step.
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, i.e. produces the next token."""
        return self.request.num_computed_tokens + self.num_new_tokens == \
            self.request.num_tokens + len(self.spec_token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- queue management -----------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the queues and give back its blocks (idempotent)."""
        if request.status.finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        request.status = status
        self.kv.free(request)
        self.requests.pop(request.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self.kv.free(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.spec_token_ids = []
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    # -- one step ----------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        loras: set[int] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            known = req.num_tokens - req.num_computed_tokens
            num_new = min(known + len(req.spec_token_ids), budget)
            if num_new <= 0 or not self._lora_fits(req, loras):
                i += 1
                continue
            spec = req.spec_token_ids[:max(0, num_new - known)]
            while not self.kv.allocate(req, num_new):
                victim = self.running[-1]  # newest running request goes back to the queue
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break
            out.scheduled.append(ScheduledRequest(req, num_new, spec))
            scheduled_ids.add(req.request_id)
            budget -= num_new
            i += 1

        if not out.preempted:
            skipped: list[Request] = []
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                if req.leader is not None and not req.leader.finished and not req.leader.prompt_computed:
                    # A sibling of an n>1 group waits for the first sibling's prompt, then reuses its blocks.
                    skipped.append(self.waiting.popleft())
                    continue
                if not self._lora_fits(req, loras):  # its adapter would need a device slot this step lacks
                    skipped.append(self.waiting.popleft())
                    continue
                # Prompt logprobs need every prompt position computed, so such requests skip the prefix cache.
                use_cache = (req.num_computed_tokens == 0 and req.sampling_params.prompt_logprobs is None
                             and req.pooling_params is None)
                cached = self.kv.find_cached_prefix(req) if use_cache else []
                cached = usable_prefix(req, cached, self.kv.block_size)
                num_new = min(req.num_tokens - req.num_computed_tokens - len(cached) * self.kv.block_size, budget)
                if not encoder_chunk_ok(req, len(cached) * self.kv.block_size, num_new):
                    break  # an encoder runs whole (bidirectional); the budget is fuller next step
                if req.pooling_params is not None and num_new < req.num_tokens:
                    break  # pooled whole or not at all (bidirectional attention); the budget is fuller next step
                if not self.kv.allocate(req, num_new, cached):
                    break
                self.kv.record_lookup(req, len(cached))
                self.waiting.popleft()
                if req.status == RequestStatus.WAITING:
                    req.num_cached_tokens = len(cached) * self.kv.block_size
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = time.time()
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                out.scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new
            self.waiting.extendleft(reversed(skipped))
        return out

    def _lora_fits(self, req: Request, loras: set[int]) -> bool:
        """Whether ``req``'s adapter fits in this step's ``max_loras`` distinct adapters (and counts it in)."""
        lora_id = req.lora_id
        if lora_id is None or self.config.max_loras is None or lora_id in loras:
            return True
        if len(loras) >= self.config.max_loras:
            return False
        loras.add(lora_id)
        return True

    def stats(self) -> dict[str, int]:
        return {"num_running": len(self.running), "num_waiting": len(self.waiting),
                "num_preemptions": self.num_preemptions}
