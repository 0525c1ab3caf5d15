"""The ``mp`` executor's driver: ``tensor_parallel_size`` worker processes (spawned, one per rank) each hold a
shard, and this object stands in for ``EngineCore`` in the user's process.

The driver keeps no model and no scheduler. It queues the frontend's request changes (adds, aborts, stops) and
sends them with each step to every rank, which all step in lockstep (see ``llmctl.executor.worker``); rank 0
returns the step's outputs. A rank that exits, reports an error or does not answer within the step timeout ends
the engine with ``EngineDeadError`` and every worker is stopped: nothing waits forever on a dead peer.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import socket
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

from llmctl.config import EngineArgs
from llmctl.engine.errors import EngineDeadError
from llmctl.engine.request import Request, RequestStatus
from llmctl.executor import messages as msg

logger = logging.getLogger(__name__)

DEFAULT_STEP_TIMEOUT_S = 300.0
DEFAULT_START_TIMEOUT_S = 1800.0  # loading a large checkpoint from a slow disk


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_groups(world_size: int) -> list[list[int] | None]:
    """This process's CPUs split into ``world_size`` contiguous groups, one per rank, so ranks do not fight over
    cores (each rank's platform then sizes its threads to its own group). None (no binding) where the
    affinity mask has fewer CPUs than ranks, off Linux, or with ``LLMCTL_MP_BIND_CPUS=0``."""
    if os.environ.get(msg.BIND_CPUS_ENV, "1") == "0" or not hasattr(os, "sched_getaffinity"):
        return [None] * world_size
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < world_size:
        return [None] * world_size
    per, extra = divmod(len(cpus), world_size)
    groups, start = [], 0
    for rank in range(world_size):
        n = per + (1 if rank < extra else 0)
        groups.append(cpus[start:start + n])
        start += n
    return groups


def _stop_workers(procs: list[Any], conns: list[Connection], grace_s: float = 5.0) -> None:
    for conn in conns:
        try:
            conn.send((msg.SHUTDOWN,))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    for conn in conns:
        conn.close()


class MultiprocCore:
    """What ``LLMEngine`` needs of an ``EngineCore``, backed by worker processes."""

    lora = None  # refused with tensor_parallel_size > 1 (EngineArgs)

    def __init__(self, args: EngineArgs) -> None:
        from llmctl.engine.core import check_tensor_parallel
        from llmctl.loader.model_loader import get_model_class
        from llmctl.loader.source import resolve_model
        from llmctl.plugins import get_plugin_manager
        from llmctl.quantization import resolve_quant_config

        self.args = args
        self.world_size = args.tensor_parallel_size
        self._step_timeout = msg.env_seconds(msg.STEP_TIMEOUT_ENV, DEFAULT_STEP_TIMEOUT_S)
        start_timeout = msg.env_seconds(msg.START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S)
        # Downloaded and checked here, once, so a bad topology fails before any process starts and the workers
        # find the checkpoint already in the cache.
        self.source = resolve_model(args.model, args.revision, args.trust_remote_code, args.download_dir,
                                    args.hf_overrides)
        registry = get_plugin_manager().registry
        model_cls = get_model_class(self.source.hf_config, registry, args.model_impl)
        check_tensor_parallel(args, self.source.hf_config, model_cls, resolve_quant_config(args.quantization,
                                                                                             self.source))
        self._pending: list[msg.Op] = []
        self._unfinished: set[str] = set()
        self._dead: str | None = None
        self._stats: dict[str, Any] = {}
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        for rank, cpus in enumerate(cpu_groups(self.world_size)):
            ours, theirs = ctx.Pipe(duplex=True)
            from llmctl.executor.worker import run_worker

            proc = ctx.Process(target=run_worker, name=f"llmctl-tp-rank{rank}", daemon=True,
                               args=(rank, self.world_size, init_method, args, theirs, os.getpid(), cpus))
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)
        self._finalizer = weakref.finalize(self, _stop_workers, self._procs, self._conns)
        try:
            info = self._wait_ready(start_timeout)
        except BaseException:
            self.shutdown()
            raise
        self.model_config = info["model_config"]
        self.cache_config = info["cache_config"]
        self.scheduler_config = info["scheduler_config"]
        self.runner_type = info["runner_type"]
        self._stats = info["stats"]
        logger.info("llmctl mp executor: %d ranks ready (pids %s)", self.world_size,
                    ", ".join(str(p.pid) for p in self._procs))

    # -- talking to the ranks ----------------------------------------------------------------------------------
    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        info: dict[str, Any] | None = None
        waiting = set(range(self.world_size))
        while waiting:
            reply, rank = self._receive(waiting, timeout, "start")
            if reply[0] == msg.ERROR:
                _, kind, text = reply
                error = ValueError if kind == "ValueError" else RuntimeError
                raise error(f"{text}" if kind == "ValueError" else f"tensor-parallel rank {rank} failed to start: "
                            f"{kind}: {text}")
            if rank == 0:
                info = reply[1]
            waiting.discard(rank)
        assert info is not None
        return info

    def _receive(self, ranks: set[int], timeout: float, what: str) -> tuple[tuple[Any, ...], int]:
        """The next message from one of ``ranks``; a worker that exits (or an error from any rank) on the way is
        reported as such rather than waited for."""
        conn_rank = {id(self._conns[r]): r for r in range(self.world_size)}
        sentinels = {p.sentinel: r for r, p in enumerate(self._procs)}
        ready = wait([*self._conns, *sentinels], timeout)
        if not ready:
            raise TimeoutError(f"no answer from the tensor-parallel ranks within {timeout:g} s ({what}); a rank "
                               f"hangs (raise {msg.STEP_TIMEOUT_ENV} if steps are legitimately this slow)")
        for obj in ready:  # messages first: a rank that failed said why before exiting
            rank = conn_rank.get(id(obj))
            if rank is None:
                continue
            try:
                reply = obj.recv()
            except (EOFError, OSError):
                continue
            if reply[0] == msg.ERROR or rank in ranks:
                return reply, rank
        for obj in ready:
            rank = sentinels.get(obj)
            if rank is not None:
                code = self._procs[rank].exitcode
                raise RuntimeError(f"tensor-parallel rank {rank} (pid {self._procs[rank].pid}) exited with code "
                                   f"{code} during {what}")
        return self._receive(ranks, timeout, what)

    def _round_trip(self, kind: str) -> list[Any]:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        ops, self._pending = self._pending, []
        try:
            payload = pickle.dumps((kind, ops), protocol=pickle.HIGHEST_PROTOCOL)  # once, not once per rank
            for conn in self._conns:
                conn.send_bytes(payload)
            reply, rank = self._receive({0}, self._step_timeout, kind)
            if reply[0] == msg.ERROR:
                raise RuntimeError(f"tensor-parallel rank {rank} failed: {reply[1]}: {reply[2]}")
        except (RuntimeError, TimeoutError, OSError) as exc:
            self._dead = f"engine workers died: {exc}"
            logger.error("llmctl mp executor: %s; stopping every rank", self._dead)
            self.shutdown()
            raise EngineDeadError(self._dead) from exc
        _, outputs, self._stats = reply
        return outputs

    # -- the EngineCore surface LLMEngine uses -----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        # Consecutive adds travel in one list, so requests of one n-group keep pointing at the same leader.
        if self._pending and self._pending[-1][0] == msg.ADD:
            self._pending[-1][1].append(request)
        else:
            self._pending.append((msg.ADD, [request]))
        request.grammar = None  # each rank compiles its own (llmctl.executor.worker._Grammars)
        self._unfinished.add(request.request_id)

    def abort(self, request_ids: list[str]) -> None:
        self._pending.append((msg.ABORT, list(request_ids)))
        self._unfinished.difference_update(request_ids)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        self._pending.append((msg.FINISH, request_id, status))
        self._unfinished.discard(request_id)

    def has_unfinished(self) -> bool:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        return bool(self._unfinished)

    def step(self) -> list[Any]:
        outputs = self._round_trip(msg.STEP)
        for out in outputs:
            if out.finish_reason is not None:
                self._unfinished.discard(out.request_id)
        return outputs

    def get_stats(self) -> dict[str, Any]:
        if self._pending and self._dead is None:  # aborts and stops change the block counts: apply them first
            self._round_trip(msg.SYNC)
        return dict(self._stats)

    def max_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.args.block_size)

    @property
    def worker_pids(self) -> list[int | None]:
        return [p.pid for p in self._procs]

    def shutdown(self) -> None:
        self._finalizer()
