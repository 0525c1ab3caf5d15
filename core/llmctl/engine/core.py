"""The engine core: one loop of schedule -> run model -> sample -> update, with no tokenizer and no I/O.

It runs in-process for the offline ``LLM`` and on its own thread for ``AsyncLLM``; nothing in it knows about
HTTP or text. Everything it steps is built once by ``llmctl.engine.startup``. Per-request failures are isolated
here: when a batched step raises, each request of the batch is retried alone and only the ones that still fail
are ended with an error.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import torch

from llmctl.config import EngineArgs
from llmctl.engine.batch_queue import BatchQueue, micro_batch_depth, without_finished
from llmctl.engine.comm_profile import install_if_enabled as install_comm_profile_if_enabled
from llmctl.engine.fault_injection import FAULT_INJECTION_ENV, InjectedFault  # noqa: F401  (re-exported)
from llmctl.engine.fault_injection import install_if_enabled as install_fault_injection_if_enabled
from llmctl.engine.model_runner import BatchInputs, ModelOutput
from llmctl.engine.request import Request, RequestStatus
from llmctl.engine.sampler import RowLogprobs, prompt_logprobs_in_slices
from llmctl.engine.scheduler import SchedulerOutput
from llmctl.engine.startup import _kv_geometry, build_engine, check_tensor_parallel  # noqa: F401  (re-exported)
from llmctl.engine.step_output import CoreOutput, ModelStepOutput
from llmctl.engine.step_stats import IterationTokenStats
from llmctl.expert_parallel import idle_moe_step
from llmctl.structured_output.request_grammar import apply_token_bitmask, fill_draft_bitmask, fill_grammar_bitmask
from llmctl.tensor_parallel import RankAddress

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, args: EngineArgs, rank: RankAddress | None = None) -> None:
        """``rank``: this process's place in a tensor-parallel group, as the ``mp`` executor's workers pass it;
        with ``external_launcher`` it comes from the launcher's environment, and without parallelism it is
        rank 0 of 1."""
        parts = build_engine(args, rank)
        self.args = parts.args
        self.platform = parts.platform
        self.source = parts.source
        self.runner_plan = parts.runner_plan
        self.runner_type = parts.runner_plan.runner
        self.world, self.tp, self.pp = parts.world, parts.tp, parts.pp
        self.ep = parts.ep
        self.device = parts.device
        self.model_config = parts.model_config
        self.scheduler_config = parts.scheduler_config
        self.cache_config = parts.cache_config
        self.kv_cache_dtype = parts.kv_cache_dtype
        self.attention = parts.attention
        self.ops = parts.ops
        self.model = parts.model
        self.model_impl = parts.model_impl
        self.lora = parts.lora
        self.kv = parts.kv
        self.scheduler = parts.scheduler
        self.runner = parts.runner
        self.sampler = parts.sampler
        self.rejection_sampler = parts.rejection_sampler
        self.speculator = parts.speculator
        install_fault_injection_if_enabled(self)  # a test seam; without its variable the step carries no check
        self._bitmask_pool: ThreadPoolExecutor | None = None
        self.num_steps = 0
        self.iteration_tokens = IterationTokenStats()
        install_comm_profile_if_enabled(self)  # a benchmark seam, likewise absent without its variable
        # Pipeline stages overlap only with several batches in flight; one stage, or a communicator without a
        # non-blocking send, steps one batch at a time below.
        self.batch_queue: BatchQueue | None = None
        depth = micro_batch_depth(self.pp.size) if self.pp.size > 1 else 1
        if depth > 1 and self.pp.can_send_async and not self.runner_plan.pooling:
            self.batch_queue = BatchQueue(self, depth)

    def shutdown(self) -> None:
        """Release the parallel group (the process group's sockets); the engine cannot step afterwards."""
        self.world.destroy()
        if self.ep is not None:
            self.ep.destroy()

    # -- requests --------------------------------------------------------------------------------------------
    def max_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.args.block_size)

    def add_request(self, request: Request) -> None:
        self.scheduler.add(request)

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.scheduler.abort(rid)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.batch_queue)

    def get_stats(self) -> dict[str, Any]:
        stats = self.kv.stats
        return {
            "kv_blocks_total": self.kv.pool.num_blocks,
            "kv_blocks_free": self.kv.num_free_blocks,
            "kv_cache_usage": self.kv.pool.usage(),
            "prefix_cache_queried_tokens": stats.queried_tokens,
            "prefix_cache_hit_tokens": stats.hit_tokens,
            "prefix_cache_hit_rate": stats.hit_tokens / stats.queried_tokens if stats.queried_tokens else 0.0,
            "num_steps": self.num_steps,
            **self.iteration_tokens.snapshot(),
            **self.scheduler.stats(),
            **(self.speculator.stats.as_dict() if self.speculator else {}),
            **self._encoder_cache_stats(),
            **({"pipeline_max_in_flight": self.batch_queue.max_in_flight} if self.batch_queue is not None else {}),
            **({"expert_parallel_rank": self.ep.rank, "expert_parallel_size": self.ep.size}
               if self.ep is not None else {}),
        }

    def _encoder_cache_stats(self) -> dict[str, int]:
        cache = self.runner.encoder_cache
        if cache is None:
            return {}
        return {"mm_encoder_cache_queries": cache.hits + cache.misses, "mm_encoder_cache_hits": cache.hits,
                "mm_encoder_cache_entries": len(cache)}

    # -- the step --------------------------------------------------------------------------------------------
    def step(self) -> list[CoreOutput]:
        if self.batch_queue is not None:
            return self.batch_queue.step()
        sched = self.scheduler.schedule()
        if not sched:
            if self.ep is not None:  # the other replicas' MoE layers wait for this one's (expert_parallel)
                idle_moe_step(self.model)
            return []
        self.num_steps += 1
        self.iteration_tokens.observe(sched.num_tokens)
        outputs = self._step(sched)
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        return outputs

    def _step(self, sched: SchedulerOutput) -> list[CoreOutput]:
        try:
            return self._run(sched)
        except Exception as exc:
            if self.ep is not None:  # the replicas' MoE collectives are out of step now: only ending them is safe
                raise
            if len(sched.scheduled) == 1:
                return self._fail(sched.scheduled[0].request, exc)
            logger.warning("batched step failed (%s); retrying its %d requests one at a time",
                           exc, len(sched.scheduled))
        outputs: list[CoreOutput] = []
        for item in sched.scheduled:
            if item.request.finished:
                continue
            try:
                outputs.extend(self._run(SchedulerOutput([item])))
            except Exception as exc:
                outputs.extend(self._fail(item.request, exc))
        return outputs

    def _fail(self, request: Request, exc: Exception) -> list[CoreOutput]:
        logger.error("request %s failed: %s: %s", request.request_id, type(exc).__name__, exc)
        message = f"{type(exc).__name__}: {exc}"
        self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
        return [CoreOutput(request.request_id, finish_reason="error", error=message)]

    def _run(self, sched: SchedulerOutput) -> list[CoreOutput]:
        batch = self.runner.prepare(sched)
        mask_job = self._start_bitmask(batch)
        return self._apply(sched, batch, self.runner.execute(batch), mask_job)

    def _start_bitmask(self, batch: BatchInputs) -> Future | None:
        """Structured output: the bitmask is filled on a worker thread while the forward pass runs (with drafts,
        one row per draft position, each after the drafts before it)."""
        grammars = [r.grammar for r in batch.sampling_requests]
        if not any(g is not None for g in grammars):
            return None
        fill = partial(fill_draft_bitmask, grammars, batch.draft_token_ids) if batch.draft_token_ids else \
            partial(fill_grammar_bitmask, grammars)
        return self._grammar_pool().submit(fill, self.model_config.vocab_size)

    def _apply(self, sched: SchedulerOutput, batch: BatchInputs, result: ModelOutput, mask_job: Future | None,
               drop_finished: bool = False) -> list[CoreOutput]:
        """Sample from the step's logits and hand the results to the scheduler. ``drop_finished``: a pipelined
        batch's requests may have ended while it was in flight; their results are dropped."""
        mask = mask_job.result() if mask_job is not None else None
        new_tokens: list[list[int]] = []
        new_logprobs: list[list[RowLogprobs] | None] = []
        if batch.draft_token_ids:
            logits = result.sample_logits
            if mask is not None:
                logits = apply_token_bitmask(logits, mask)
            verified = self.rejection_sampler(logits, batch.sampling_requests, batch.draft_token_ids)
            new_tokens, new_logprobs = verified.token_ids, verified.logprobs
            self.speculator.record(sum(1 for d in batch.draft_token_ids if d), verified.num_draft_tokens,
                                   verified.num_accepted_tokens)
        elif batch.sampling_requests:
            sampled = self.sampler(result.sample_logits, batch.sampling_requests, mask)
            new_tokens = [[t] for t in sampled.token_ids]
            new_logprobs = [None if lp is None else [lp] for lp in sampled.logprobs]
        step_output = ModelStepOutput(batch.sampling_requests, new_tokens, new_logprobs,
                                      self._prompt_logprobs(result.prompt_hidden), result.pooled or {})
        if drop_finished:
            sched, step_output = without_finished(sched, step_output)
        outputs = self.scheduler.update_from_output(sched, step_output)
        if self.runner.keep_hidden:  # EAGLE reads the positions just computed, with their hidden states
            self.speculator.observe(sched, batch, result.hidden)
        return outputs

    def _grammar_pool(self) -> ThreadPoolExecutor:
        if self._bitmask_pool is None:
            self._bitmask_pool = ThreadPoolExecutor(1, thread_name_prefix="llmctl-bitmask")
        return self._bitmask_pool

    def _prompt_logprobs(self, prompt_hidden) -> dict[str, tuple[int, list[RowLogprobs]]]:
        """Logprobs of each prompt chunk's next tokens, from the hidden states the runner kept for them (the LM
        head runs here, a slice of rows at a time, rather than on every prompt row in the forward pass)."""
        out: dict[str, tuple[int, list[RowLogprobs]]] = {}
        for rid, (chunk, hidden) in prompt_hidden.items():
            req = chunk.request
            first = chunk.first_position
            targets = torch.tensor(req.prompt_token_ids[first + 1:first + 1 + len(chunk.rows)], device=hidden.device)
            compute = self.runner.model.compute_logits
            if self.lora is not None:  # an adapter on the LM head applies to the request's prompt logprobs too
                compute = self.lora.logits_for(req.lora, compute)
            out[rid] = (first + 1, prompt_logprobs_in_slices(hidden, compute, targets,
                                                             req.sampling_params.prompt_logprobs))
        return out

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """Used by the frontend when a stop string ends a request the core cannot see as finished."""
        self.scheduler.finish_requests([request_id], status)
