"""Pipeline micro-batches in flight: with ``pipeline_parallel_size`` stages, a rank keeps up to that many batches
outstanding, as vLLM's batch queue does, so that the stages overlap instead of taking turns.

Every rank runs its own scheduler in lockstep (llmctl.executor.worker), so the batch queue lives in each rank's
``EngineCore``, not in the driver: each ``step()`` schedules a new batch from the requests that are not in flight
and starts it, then, once as many batches are outstanding as there are stages (or nothing new could be
scheduled), completes the oldest one (the last stage's logits broadcast, sampling, the scheduler's update) and
returns its outputs. Batches complete in the order they started, and a request is in at most one of them
(``Scheduler.in_flight``).

Stage ``s`` runs a batch's layers ``s`` steps after the batch starts (the first stage at once, the last one when
the batch completes), each stage's sends are started without waiting (``Communicator.isend``), so in a full
queue each stage works on a different batch in the same step: stage 0 on batch k+1 while stage 1 runs batch k.
Every rank takes the same decisions from the same queue, so the point-to-point transfers and the broadcasts
happen in the same order everywhere.

A request that ends while its batch is in flight (an abort, a stop string) gives its blocks back at once; the
batch still runs on every stage (the ranks must stay in step), and its results for that request are dropped. The
blocks may meanwhile go to a request of a later batch: every stage runs batches in order, so the later batch
writes those slots after the stale batch did, and a request only ever reads slots it wrote itself.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from llmctl.engine.scheduler import SchedulerOutput
from llmctl.engine.step_output import CoreOutput, ModelStepOutput

if TYPE_CHECKING:
    from llmctl.engine.core import EngineCore
    from llmctl.engine.model_runner import BatchInputs

logger = logging.getLogger(__name__)

MICRO_BATCHES_ENV = "LLMCTL_PP_MICRO_BATCHES"
"""Batches in flight under pipeline parallelism: unset = one per stage; ``1`` = one batch at a time (the stages take
turns, as before micro-batches; benchmarks compare the two). Every rank must see the same value (the ranks check)."""


def micro_batch_depth(pp_size: int) -> int:
    raw = os.environ.get(MICRO_BATCHES_ENV, "")
    if not raw:
        return pp_size
    try:
        depth = int(raw)
    except ValueError:
        raise ValueError(f"{MICRO_BATCHES_ENV}: must be an integer >= 1, got {raw!r}") from None
    if depth < 1:
        raise ValueError(f"{MICRO_BATCHES_ENV}: must be an integer >= 1, got {raw!r}")
    return min(depth, pp_size)


@dataclass
class InFlightBatch:
    sched: SchedulerOutput
    batch: BatchInputs
    hidden: torch.Tensor | None = None  # this stage's output (kept alive until its sends are done)
    sends: list[Any] = field(default_factory=list)  # handles of this stage's non-blocking sends
    forwarded: bool = False
    error: Exception | None = None


class BatchQueue:
    def __init__(self, core: EngineCore, depth: int) -> None:
        self.core = core
        self.depth = depth
        self.stage = core.pp.rank
        self.queue: deque[InFlightBatch] = deque()
        self.max_in_flight = 0  # the most batches outstanding at once so far (get_stats: pipeline_max_in_flight)

    def __len__(self) -> int:
        return len(self.queue)

    def step(self) -> list[CoreOutput]:
        core = self.core
        launched = False
        if len(self.queue) < self.depth:
            sched = core.scheduler.schedule(self._batch_seqs())
            if sched:
                core.num_steps += 1
                core.iteration_tokens.observe(sched.num_tokens)
                try:
                    batch = core.runner.prepare(sched)
                except Exception as exc:  # the same on every rank: the batch never starts anywhere
                    logger.warning("pipelined batch of %d requests failed: %s", len(sched.scheduled), exc)
                    return [out for s in sched.scheduled for out in core._fail(s.request, exc)]
                self.queue.append(InFlightBatch(sched, batch))
                core.scheduler.in_flight.update(item.request.request_id for item in sched.scheduled)
                launched = True
                self.max_in_flight = max(self.max_in_flight, len(self.queue))
        # Stage s has run every batch but the s newest: the first stage the one just started, the last one only
        # the batch it completes now.
        for item in list(self.queue)[:max(0, len(self.queue) - self.stage)]:
            self._forward(item)
        if self.queue and (not launched or len(self.queue) == self.depth):
            return self._complete(self.queue.popleft())
        return []

    def _batch_seqs(self) -> int:
        """An even share of the requests that could run, per batch in flight: with every request in one batch,
        the next would find nothing to schedule and the stages would take turns again."""
        scheduler = self.core.scheduler
        active = min(len(scheduler.running) + len(scheduler.waiting), scheduler.config.max_num_seqs)
        return max(1, -(-active // self.depth))

    def _forward(self, item: InFlightBatch) -> None:
        if item.forwarded:
            return
        item.forwarded = True
        pp = self.core.pp
        pp.pending_sends = item.sends
        try:
            item.hidden = self.core.runner.forward(item.batch)
        except Exception as exc:  # ended with the batch's requests when it completes
            item.error = exc
        finally:
            pp.pending_sends = None

    def _complete(self, item: InFlightBatch) -> list[CoreOutput]:
        core = self.core
        self._forward(item)
        core.scheduler.in_flight.difference_update(s.request.request_id for s in item.sched.scheduled)
        try:
            if item.error is not None:
                raise item.error
            assert item.hidden is not None
            mask_job = core._start_bitmask(item.batch)
            result = core.runner.finish(item.batch, item.hidden)
            return core._apply(item.sched, item.batch, result, mask_job, drop_finished=True)
        except Exception as exc:
            logger.warning("pipelined batch of %d requests failed: %s", len(item.sched.scheduled), exc)
            return [out for s in item.sched.scheduled if not s.request.finished
                    for out in core._fail(s.request, exc)]
        finally:
            for work in item.sends:
                work.wait()


def without_finished(sched: SchedulerOutput, result: ModelStepOutput) -> tuple[SchedulerOutput, ModelStepOutput]:
    """The batch's scheduled chunks and results less those of requests that ended while it was in flight."""
    if not any(s.request.finished for s in sched.scheduled):
        return sched, result
    live = SchedulerOutput([s for s in sched.scheduled if not s.request.finished], sched.preempted)
    rows = [i for i, r in enumerate(result.sampling_requests) if not r.finished]
    return live, ModelStepOutput([result.sampling_requests[i] for i in rows], [result.new_token_ids[i] for i in rows],
                                 [result.new_logprobs[i] for i in rows],
                                 {rid: v for rid, v in result.prompt_logprobs.items()
                                  if rid in {s.request.request_id for s in live.scheduled}},
                                 result.pooled)
