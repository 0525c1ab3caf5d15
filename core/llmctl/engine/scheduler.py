"""Decides what runs each step and applies what the step produced: continuous batching under a token budget,
chunked prefill, at most ``max_num_partial_prefills`` prompts per step (when set), FCFS admission, preemption by
recompute of the newest request when KV blocks run out; then (``update_from_output``) computed tokens, rejected
drafts, new tokens and the stop checks. The scheduler is the one component that changes a ``Request``'s progress
and status.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from llmctl.config import SchedulerConfig
from llmctl.engine.encoder_decoder import encoder_chunk_ok, usable_prefix
from llmctl.engine.request import Request, RequestStatus
from llmctl.engine.step_output import CoreOutput, ModelStepOutput
from llmctl.kv.block_pool import KVBlock
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
        # Steps that carried only decodes since the last step with a prompt chunk (min_decode_steps_between_prefills)
        self._decode_steps_since_prefill = 1 << 62
        # Requests in a batch whose results have not come back (pipeline micro-batches, engine/batch_queue.py):
        # never scheduled again nor preempted until then. Always empty with one batch at a time.
        self.in_flight: set[str] = set()

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
        self._free_blocks(request)
        self.requests.pop(request.request_id, None)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """End requests by id (unknown or already finished ids are ignored): a stop string the output processor
        matched, or an abort."""
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is not None:
                self.finish(request, status)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def _newest_preemptible(self) -> Request:
        """The newest running request not in flight (the one being scheduled, at worst, is not)."""
        if not self.in_flight:
            return self.running[-1]
        return next(r for r in reversed(self.running) if r.request_id not in self.in_flight)

    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self._free_blocks(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.spec_token_ids = []
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    # -- KV blocks: the manager owns the tables, the request shows its own (the runner reads it) -------------------
    def _allocate(self, req: Request, num_new_tokens: int, cached: list[KVBlock] | None = None) -> bool:
        if not self.kv.allocate(req.request_id, req.num_computed_tokens, num_new_tokens, cached):
            return False
        if cached:  # adopted prefix blocks hold computed tokens
            req.num_computed_tokens += len(cached) * self.kv.block_size
        req.block_ids = self.kv.block_ids(req.request_id)
        return True

    def _free_blocks(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.block_ids = []

    # -- one step ----------------------------------------------------------------------------------------------
    def schedule(self, max_seqs: int | None = None) -> SchedulerOutput:
        """``max_seqs``: at most this many requests in the batch (pipeline micro-batches share the running
        requests between them; ``max_num_seqs`` still bounds all of them together)."""
        out = SchedulerOutput()
        cap = max_seqs or (1 << 62)
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        loras: set[int] = set()

        # Requests with a prompt chunk in this step (max_num_partial_prefills); a decode computes one known token.
        prefills = 0
        max_prefills = self.config.max_num_partial_prefills or (1 << 62)
        if self._decode_steps_since_prefill < self.config.min_decode_steps_between_prefills and \
                self._has_decode(cap):
            max_prefills = 0  # this step is the decodes' own; prompts wait for the next one
        i = 0
        while i < len(self.running) and budget > 0 and len(out.scheduled) < cap:
            req = self.running[i]
            if self.in_flight and req.request_id in self.in_flight:
                i += 1
                continue
            known = req.num_tokens - req.num_computed_tokens
            num_new = min(known + len(req.spec_token_ids), budget, self._chunk_cap(req))
            if num_new <= 0 or (known > 1 and prefills >= max_prefills) or not self._lora_fits(req, loras):
                i += 1
                continue
            spec = req.spec_token_ids[:max(0, num_new - known)]
            while not self._allocate(req, num_new):
                victim = self._newest_preemptible()  # newest running request goes back to the queue
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break
            out.scheduled.append(ScheduledRequest(req, num_new, spec))
            scheduled_ids.add(req.request_id)
            budget -= num_new
            prefills += known > 1
            i += 1

        if not out.preempted:
            skipped: list[Request] = []
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and \
                    len(out.scheduled) < cap:
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
                cached = self.kv.find_cached_prefix(req.request_id, req.all_token_ids, salt=req.cache_salt,
                                                    mm_features=req.mm_features) if use_cache else []
                cached = usable_prefix(req, cached, self.kv.block_size)
                num_new = min(req.num_tokens - req.num_computed_tokens - len(cached) * self.kv.block_size, budget,
                              self._chunk_cap(req))
                if num_new > 1 and prefills >= max_prefills:
                    break  # FCFS: later prompts wait too. A one-token remainder (a cached prompt, an n > 1
                    # sibling over its leader's blocks) costs what a decode does and is not held back.
                if not encoder_chunk_ok(req, len(cached) * self.kv.block_size, num_new):
                    break  # an encoder runs whole (bidirectional); the budget is fuller next step
                if req.pooling_params is not None and num_new < req.num_tokens:
                    break  # pooled whole or not at all (bidirectional attention); the budget is fuller next step
                if not self._allocate(req, num_new, cached):
                    break
                self.kv.record_lookup(req.num_tokens, len(cached))
                self.waiting.popleft()
                if req.status == RequestStatus.WAITING:
                    req.num_cached_tokens = len(cached) * self.kv.block_size
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = time.time()
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                out.scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new
                prefills += num_new > 1
            self.waiting.extendleft(reversed(skipped))
        if prefills:
            self._decode_steps_since_prefill = 0
        elif out.scheduled:
            self._decode_steps_since_prefill += 1
        return out

    def _has_decode(self, cap: int) -> bool:
        """Whether this step would carry at least one decode (a step never holds prompts back for nothing)."""
        for req in self.running[:cap] if not self.in_flight else self.running:
            if req.request_id not in self.in_flight and req.num_tokens - req.num_computed_tokens <= 1:
                return True
        return False

    # -- applying the step's results --------------------------------------------------------------------------
    def update_from_output(self, sched: SchedulerOutput, result: ModelStepOutput) -> list[CoreOutput]:
        """Apply one step's results to its requests, in order: computed tokens (and the prefix cache's full
        blocks), rejected drafts rolled back, pooled requests finished, prompt logprobs passed on, new tokens
        appended with the grammar and stop checks. Returns one ``CoreOutput`` per request that has news."""
        outputs: dict[str, CoreOutput] = {}
        accepted = {id(r): len(t) - 1 for r, t in zip(result.sampling_requests, result.new_token_ids, strict=True)}
        for item in sched.scheduled:
            req = item.request
            req.num_computed_tokens += item.num_new_tokens
            if item.spec_token_ids:
                # Roll back the slots of rejected drafts: their KV is stale and gets overwritten, and blocks
                # holding nothing else go back to the pool.
                req.num_computed_tokens -= len(item.spec_token_ids) - accepted[id(req)]
                self.kv.trim(req.request_id, req.num_computed_tokens)
            self.kv.cache_computed_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens,
                                          salt=req.cache_salt, mm_features=req.mm_features)
        for rid, data in result.pooled.items():
            req = self.requests[rid]
            outputs[rid] = CoreOutput(rid, finish_reason="stop", pooled=data, num_cached_tokens=req.num_cached_tokens,
                                      first_scheduled_time=req.first_scheduled_time)
            self.finish(req, RequestStatus.FINISHED_STOPPED)
        for rid, (start, rows) in result.prompt_logprobs.items():
            req = self.requests[rid]
            out = outputs.setdefault(rid, _core_output(req))
            out.prompt_logprobs, out.prompt_logprobs_start = rows, start
        for req, tokens, lps in zip(result.sampling_requests, result.new_token_ids, result.new_logprobs, strict=True):
            out = outputs.setdefault(req.request_id, _core_output(req))
            for j, token in enumerate(tokens):
                req.all_token_ids.append(token)
                out.new_token_ids.append(token)
                if lps is not None:
                    out.new_logprobs = (out.new_logprobs or []) + [lps[j]]
                if req.grammar is not None and not req.grammar.accept(token):
                    out.finish_reason, out.error = "error", f"token {token} is not allowed by the request's grammar"
                    self.finish(req, RequestStatus.FINISHED_ERROR)
                    break
                reason = self._stop_reason(req, token)
                if req.grammar is not None and req.grammar.terminated:  # the grammar took its stop token: done,
                    reason = ("stop", None)  # ignore_eos or not (nothing could follow it)
                if reason is not None:  # tokens accepted after a stop are dropped
                    out.finish_reason, out.stop_reason = reason
                    status = RequestStatus.FINISHED_LENGTH if reason[0] == "length" else RequestStatus.FINISHED_STOPPED
                    self.finish(req, status)
                    break
        return list(outputs.values())

    def _stop_reason(self, req: Request, token: int) -> tuple[str, int | str | None] | None:
        """EOS, stop token ids (both only after ``min_tokens``), ``max_tokens`` or the context. Stop *strings*
        need text, so the output processor checks them and ends the request through ``finish_requests``."""
        sp = req.sampling_params
        n_out = req.num_output_tokens
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and token in req.eos_token_ids:
                return ("stop", None)
            if token in sp.stop_token_ids:
                return ("stop", token)
        if n_out >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return ("length", None)
        return None

    def _chunk_cap(self, req: Request) -> int:
        """The most tokens ``req`` may compute this step under ``long_prefill_token_threshold`` (vLLM's rule).

        Why: a step is as slow as its largest prompt chunk, and every decode in it waits for that chunk. Pooling
        requests are exempt: they are computed whole or not at all.
        """
        cap = self.config.long_prefill_token_threshold
        if cap <= 0 or req.pooling_params is not None:
            return 1 << 62
        return cap

    def _lora_fits(self, req: Request, loras: set[int]) -> bool:
        """Whether ``req``'s adapter fits in this step's ``max_loras`` distinct adapters (and counts it in).

        Adapters are told apart as the device slots tell them apart, by the adapter object the request holds, not
        by its id: an adapter removed and read again, or replaced under its id by another path, while requests of
        the old one still run, is a second adapter that needs a slot of its own."""
        if req.lora is None or self.config.max_loras is None:
            return True
        key = id(req.lora)  # the requests of this step keep their adapters alive, so ids are unique within it
        if key in loras:
            return True
        if len(loras) >= self.config.max_loras:
            return False
        loras.add(key)
        return True

    def stats(self) -> dict[str, int]:
        return {"num_running": len(self.running), "num_waiting": len(self.waiting),
                "num_preemptions": self.num_preemptions}


def _core_output(req: Request) -> CoreOutput:
    return CoreOutput(req.request_id, num_cached_tokens=req.num_cached_tokens,
                      first_scheduled_time=req.first_scheduled_time)
