"""Data parallelism: ``data_parallel_size`` replicas of the whole model behind one frontend (one tokenizer, one
output processor, one API server). Each replica is an ``mp`` engine of its own (its ranks are worker processes,
one when it has no tensor or pipeline parallelism) on its own share of the CPUs.

Each request goes to one replica and stays there. The choice is by load (fewest unfinished requests) with prefix
affinity: a prompt whose first block was seen before goes back to the replica that saw it, whose prefix cache
likely holds it, unless that replica is busier than the least loaded one by more than ``AFFINITY_SLACK``
requests. The siblings of an ``n > 1`` request follow their leader. A step sends work to every replica that has
some before waiting for any, so replicas compute at the same time.

With ``enable_expert_parallel`` on a mixture-of-experts model the replicas share their experts
(``llmctl.expert_parallel``): their ranks form one expert-parallel group, every MoE layer exchanges tokens between
replicas, so the replicas step in lockstep: whenever any replica has work every replica steps (an idle one runs
its MoE layers on no tokens), and none steps when none has. Each replica's waits also watch the other replicas'
ranks, since a rank that dies leaves the others' collectives waiting for it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from typing import Any

from llmctl.config import EngineArgs
from llmctl.engine.errors import EngineDeadError
from llmctl.engine.request import Request, RequestStatus
from llmctl.executor import messages as msg
from llmctl.executor.mp import MultiprocCore, _free_port, split_cpus
from llmctl.tensor_parallel import DataParallelAddress

logger = logging.getLogger(__name__)

AFFINITY_SLACK = 4
_AFFINITY_ENTRIES = 65536

# Stats that add up over replicas; the rest are recomputed (ratios) or taken per replica.
_SUMMED = ("kv_blocks_total", "kv_blocks_free", "prefix_cache_queried_tokens", "prefix_cache_hit_tokens",
           "num_steps", "num_running", "num_waiting", "num_preemptions", "iteration_tokens_sum",
           "iteration_tokens_count")


def _replica_cpus(replicas: int) -> list[list[int] | None]:
    if not hasattr(os, "sched_getaffinity"):
        return [None] * replicas
    return split_cpus(sorted(os.sched_getaffinity(0)), replicas)


def _share_experts(args: EngineArgs) -> bool:
    """Whether the replicas share their experts; its refusals (naming the setting) come before any replica
    starts."""
    if not args.enable_expert_parallel:
        return False
    from llmctl.expert_parallel import check_across_replicas
    from llmctl.loader.model_loader import get_model_class
    from llmctl.loader.source import resolve_model
    from llmctl.plugins import get_plugin_manager
    from llmctl.quantization import resolve_quant_config

    source = resolve_model(args.model, args.revision, args.trust_remote_code, args.download_dir, args.hf_overrides)
    model_cls = get_model_class(source.hf_config, get_plugin_manager().registry, args.model_impl)
    return check_across_replicas(args, source.hf_config, model_cls, resolve_quant_config(args.quantization, source))


def _wait_all_ready(replicas: list[MultiprocCore], lockstep: bool) -> None:
    """Every replica's start-up. Replicas that share their experts stop waiting for each other when one's rank
    exits, so all of them fail together: each is waited for, and a configuration error (``ValueError``) is the
    one raised, since it says what to fix."""
    errors: list[BaseException] = []
    for replica in replicas:
        try:
            replica.wait_ready()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, once every replica was waited for
            errors.append(exc)
            if not lockstep or not isinstance(exc, Exception):
                break
    if errors:
        raise next((e for e in errors if isinstance(e, ValueError)), errors[0])


class DataParallelCore:
    lora = None  # refused with data_parallel_size > 1 (EngineArgs)

    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.replicas: list[MultiprocCore] = []
        self.lockstep = _share_experts(args)
        # a replica is an engine of its own; one sharing experts keeps the count, which places them over all ranks
        replica_args = args if self.lockstep else dataclasses.replace(args, data_parallel_size=1)
        dp = args.data_parallel_size
        init_method = f"tcp://127.0.0.1:{_free_port()}" if self.lockstep else ""
        try:  # every replica's workers load at the same time
            for index, cpus in enumerate(_replica_cpus(dp)):
                address = DataParallelAddress(index, dp, init_method) if self.lockstep else None
                self.replicas.append(MultiprocCore(dataclasses.replace(replica_args), cpus=cpus, wait=False,
                                                   data_parallel=address))
            if self.lockstep:
                for index, replica in enumerate(self.replicas):
                    replica.watch({f"data-parallel replica {j} rank {k}": proc
                                   for j, other in enumerate(self.replicas) if j != index
                                   for k, proc in enumerate(other._procs)})
            _wait_all_ready(self.replicas, self.lockstep)
        except BaseException:
            self.shutdown()
            raise
        first = self.replicas[0]
        self.source = first.source
        self.model_config, self.cache_config = first.model_config, first.cache_config
        self.scheduler_config, self.runner_type = first.scheduler_config, first.runner_type
        self._owner: dict[str, int] = {}
        self._affinity: OrderedDict[tuple[int, ...], int] = OrderedDict()
        self._dead: str | None = None
        logger.info("llmctl data parallel: %d replicas%s", len(self.replicas),
                    " sharing their experts (expert parallelism, lockstep steps)" if self.lockstep else "")

    # -- routing ---------------------------------------------------------------------------------------------
    def _route(self, request: Request) -> int:
        if request.leader is not None and request.leader.request_id in self._owner:
            return self._owner[request.leader.request_id]
        loads = [r.num_unfinished for r in self.replicas]
        least = min(range(len(loads)), key=loads.__getitem__)
        key = tuple(request.prompt_token_ids[:self.args.block_size])
        if len(key) < self.args.block_size:  # no full block: nothing a prefix cache could share
            return least
        seen = self._affinity.get(key)
        choice = seen if seen is not None and loads[seen] <= loads[least] + AFFINITY_SLACK else least
        self._affinity[key] = choice
        self._affinity.move_to_end(key)
        if len(self._affinity) > _AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)
        return choice

    # -- the EngineCore surface LLMEngine uses -----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        index = self._route(request)
        self._owner[request.request_id] = index
        self.replicas[index].add_request(request)

    def abort(self, request_ids: list[str]) -> None:
        by_replica: dict[int, list[str]] = {}
        for rid in request_ids:
            index = self._owner.pop(rid, None)
            if index is not None:
                by_replica.setdefault(index, []).append(rid)
        for index, ids in by_replica.items():
            self.replicas[index].abort(ids)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        index = self._owner.pop(request_id, None)
        if index is not None:
            self.replicas[index].finish_request(request_id, status)

    def has_unfinished(self) -> bool:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        return any(r.num_unfinished for r in self.replicas)

    def step(self) -> list[Any]:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        active = [r for r in self.replicas if r.num_unfinished]
        if self.lockstep and active:  # every replica's MoE layers exchange tokens: all step, or none
            active = self.replicas
        try:
            for r in active:
                r.begin(msg.STEP)
            outputs: list[Any] = []
            for r in active:
                outputs.extend(r.end())
        except EngineDeadError as exc:  # one replica's death ends the engine: its requests are lost anyway
            self._dead = str(exc)
            self.shutdown()
            raise
        for out in outputs:
            if out.finish_reason is not None:
                self._owner.pop(out.request_id, None)
        return outputs

    def get_stats(self) -> dict[str, Any]:
        per = [r.get_stats() for r in self.replicas] if self._dead is None else []
        if not per:
            return {}
        total: dict[str, Any] = {**per[0]}
        for key in _SUMMED:
            if all(key in p for p in per):
                total[key] = sum(p[key] for p in per)
        if total.get("kv_blocks_total"):
            total["kv_cache_usage"] = 1.0 - total["kv_blocks_free"] / total["kv_blocks_total"]
        queried = total.get("prefix_cache_queried_tokens") or 0
        total["prefix_cache_hit_rate"] = total.get("prefix_cache_hit_tokens", 0) / queried if queried else 0.0
        if all("iteration_tokens_buckets" in p for p in per):  # same bounds on every replica: add the counts
            total["iteration_tokens_buckets"] = tuple(
                (rows[0][0], sum(count for _, count in rows))
                for rows in zip(*(p["iteration_tokens_buckets"] for p in per), strict=True))
        total["replicas"] = per
        return total

    @property
    def worker_pids(self) -> list[int | None]:
        return [pid for r in self.replicas for pid in r.worker_pids]

    def max_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.args.block_size)

    def shutdown(self) -> None:
        for r in self.replicas:
            r.shutdown()
