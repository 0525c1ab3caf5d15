"""The ``mp`` executor: ``tensor_parallel_size`` worker processes (spawned, one per rank) each hold a shard, and
:class:`MultiprocCore` stands in for ``EngineCore`` in the user's process (see ``llmctl.executor.remote``).

Each step's message is encoded once (``llmctl.executor.step_codec``) and written once into a shared-memory ring
(``llmctl.executor.shm_ring``) that every rank reads; where no segment can be created, or with
``LLMCTL_MP_SHM_BROADCAST=0``, the same bytes go over each rank's pipe instead. Answers come back over each rank's
own pipe. The driver waits on the pipes and on the processes' sentinels together, so a rank that exits is noticed
at once and one that hangs after the step timeout; a write into a full ring also checks the ranks' processes and
gives up at the step timeout: nothing waits forever on a dead peer. The ring's segment is unlinked when the
engine stops, and by multiprocessing's resource tracker if the driver is killed.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

from llmctl.config import EngineArgs
from llmctl.executor import messages as msg
from llmctl.executor import step_codec
from llmctl.executor.remote import RemoteCore
from llmctl.executor.shm_ring import RingClosed, ShmRingWriter, ring_doorbell
from llmctl.tensor_parallel import DataParallelAddress

logger = logging.getLogger(__name__)


# Linux pipes buffer 64 KiB; a message up to half of that is written without blocking even if the previous
# (already read, or tiny) messages are still in the pipe.
_PIPE_SAFE_BYTES = 32 << 10
# How long the ranks of an engine that died (a rank died or hangs) get to leave before they are terminated, and
# then killed: live ranks leave as soon as the ring closes, so this is short; a normal shutdown waits longer.
DEAD_ENGINE_GRACE_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_groups(world_size: int, cpus: list[int] | None = None) -> list[list[int] | None]:
    """``cpus`` (default: this process's CPUs) split into ``world_size`` contiguous groups, one per rank, so ranks
    do not fight over cores (each rank's platform then sizes its threads to its own group). None (no binding)
    where there are fewer CPUs than ranks, off Linux, or with ``LLMCTL_MP_BIND_CPUS=0``."""
    if os.environ.get(msg.BIND_CPUS_ENV, "1") == "0" or not hasattr(os, "sched_getaffinity"):
        return [None] * world_size
    return split_cpus(sorted(cpus if cpus is not None else os.sched_getaffinity(0)), world_size)


def split_cpus(cpus: list[int], parts: int) -> list[list[int] | None]:
    """``cpus`` in ``parts`` contiguous groups, the first ones a CPU larger when they do not divide; None for
    every part when there are fewer CPUs than parts."""
    if len(cpus) < parts:
        return [None] * parts
    per, extra = divmod(len(cpus), parts)
    groups: list[list[int] | None] = []
    start = 0
    for i in range(parts):
        n = per + (1 if i < extra else 0)
        groups.append(cpus[start:start + n])
        start += n
    return groups


def _make_ring(world_size: int) -> ShmRingWriter | None:
    if os.environ.get(msg.SHM_BROADCAST_ENV, "1") == "0":
        return None
    try:
        return ShmRingWriter(world_size)
    except OSError as exc:  # no /dev/shm, or too small: the pipes carry the steps
        logger.warning("llmctl mp executor: no shared-memory ring (%s); step messages go over pipes", exc)
        return None


def _stop_workers(procs: list[Any], conns: list[Connection], ring: ShmRingWriter | None, doorbells: list[Connection],
                  grace_s: float = 5.0) -> None:
    if ring is not None:
        ring.close()  # the readers see it closed; the segment is unlinked now, their mappings stay valid
    for bell in doorbells:  # end-of-file wakes a rank asleep on the ring
        bell.close()
    shutdown = step_codec.encode_step(msg.SHUTDOWN, [])
    for conn in conns:
        try:  # never blocks: a hung rank may have left its pipe full
            os.set_blocking(conn.fileno(), False)
            conn.send_bytes(shutdown)
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


class MultiprocCore(RemoteCore):
    """The ranks as spawned worker processes of this one: step messages through one shared-memory ring, answers
    over each rank's own pipe."""

    def __init__(self, args: EngineArgs, cpus: list[int] | None = None, wait: bool = True,
                 data_parallel: DataParallelAddress | None = None) -> None:
        """``cpus``: the CPUs this engine's ranks share (a data-parallel replica's part); default: all of ours.
        ``wait=False``: return once the workers are started; call :meth:`wait_ready` before using the engine.
        ``data_parallel``: this replica's place among replicas that share their experts."""
        super().__init__(args)
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self._ring = _make_ring(self.world_size)
        ring_name = None if self._ring is None else self._ring.name
        self._doorbells: list[Connection] = []  # the write ends; each rank sleeps on its read end
        self._peers: dict[str, Any] = {}  # other engines' ranks this one's waits also watch (watch)
        from llmctl.executor.worker import run_worker

        for rank, rank_cpus in enumerate(cpu_groups(self.world_size, cpus)):
            ours, theirs = ctx.Pipe(duplex=True)
            bell_theirs, bell_ours = ctx.Pipe(duplex=False) if self._ring is not None else (None, None)
            proc = ctx.Process(target=run_worker, name=f"llmctl-tp-rank{rank}", daemon=True,
                               args=(rank, self.world_size, init_method, args, theirs, os.getpid(), rank_cpus,
                                     ring_name, bell_theirs, data_parallel))
            proc.start()
            theirs.close()
            if bell_ours is not None:
                bell_theirs.close()
                os.set_blocking(bell_ours.fileno(), False)
                self._doorbells.append(bell_ours)
            self._procs.append(proc)
            self._conns.append(ours)
        self._finalizer = weakref.finalize(self, _stop_workers, self._procs, self._conns, self._ring,
                                          self._doorbells)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait until every rank has loaded (``wait=False`` leaves this to the caller, who may start other
        engines meanwhile)."""
        try:
            self._set_info(self._wait_ready(self._start_timeout))
        except BaseException:
            self.shutdown()
            raise
        logger.info("llmctl mp executor: %d ranks ready (pids %s)", self.world_size,
                    ", ".join(str(p.pid) for p in self._procs))

    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        info: dict[str, Any] | None = None
        waiting = set(range(self.world_size))
        while waiting:
            reply, rank = self._next_message(waiting, timeout, "start")
            if reply[0] == msg.ERROR:
                _, kind, text = reply
                if kind == "ValueError":  # a configuration error: the user's to fix, raised as such
                    raise ValueError(text)
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start: {kind}: {text}")
            if rank == 0:
                info = reply[1]
            waiting.discard(rank)
        assert info is not None
        return info

    def _next_message(self, ranks: set[int], timeout: float, what: str) -> tuple[tuple[Any, ...], int]:
        """The next message from one of ``ranks``; a worker that exits (or an error from any rank) on the way is
        reported as such rather than waited for."""
        conn_rank = {id(self._conns[r]): r for r in range(self.world_size)}
        sentinels = {p.sentinel: r for r, p in enumerate(self._procs)}
        peers = {p.sentinel: (name, p) for name, p in self._peers.items()}
        ready = wait([*self._conns, *sentinels, *peers], timeout)
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
        for obj in ready:
            if obj in peers:
                name, proc = peers[obj]
                proc.join(1.0)  # its sentinel fires a moment before its exit code is known
                raise RuntimeError(f"{name} (pid {proc.pid}) exited with code {proc.exitcode} during {what}")
        return self._next_message(ranks, timeout, what)

    def _send(self, payload: bytes) -> None:
        if self._ring is not None:
            try:
                self._ring.write(payload, timeout=self._step_timeout, check=self._check_ranks, wake=self._wake)
            except TimeoutError:
                raise TimeoutError(f"the tensor-parallel ranks did not take a {len(payload)}-byte step message "
                                   f"within {self._step_timeout:g} s; a rank hangs") from None
            except RingClosed as exc:
                raise RuntimeError(f"tensor-parallel ranks: {exc}") from None
            return
        if len(payload) <= _PIPE_SAFE_BYTES:
            for conn in self._conns:
                conn.send_bytes(payload)
        else:
            self._send_bounded(payload)

    def _wake(self, rank: int) -> None:
        """The doorbell for a rank asleep on the ring: one byte, never a copy of the message."""
        ring_doorbell(self._doorbells[rank].fileno())

    def _check_ranks(self) -> None:
        """Raise for a rank that has exited (with its own error message when it sent one)."""
        for rank, proc in enumerate(self._procs):
            if proc.exitcode is None:
                continue
            conn = self._conns[rank]
            try:
                reply = conn.recv() if conn.poll(0) else None
            except (EOFError, OSError):
                reply = None
            if reply is not None and reply[0] == msg.ERROR:
                raise RuntimeError(f"tensor-parallel rank {rank} failed: {reply[1]}: {reply[2]}")
            raise RuntimeError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode} "
                               f"during a step")

    def _receive(self) -> tuple[Any, ...]:
        reply, rank = self._next_message({0}, self._step_timeout, "a step")
        if reply[0] == msg.ERROR:
            raise RuntimeError(f"tensor-parallel rank {rank} failed: {reply[1]}: {reply[2]}")
        return reply

    def _send_bounded(self, payload: bytes) -> None:
        """A message larger than a pipe's buffer blocks until the rank reads it, so a hung rank would hang the
        driver in ``send``: such messages are written from a thread that the step timeout bounds."""
        failure: list[BaseException] = []

        def send_all() -> None:
            try:
                for conn in self._conns:
                    conn.send_bytes(payload)
            except BaseException as exc:
                failure.append(exc)

        sender = threading.Thread(target=send_all, name="llmctl-mp-send", daemon=True)
        sender.start()
        sender.join(self._step_timeout)
        if sender.is_alive():
            raise TimeoutError(f"the tensor-parallel ranks did not take a {len(payload)}-byte step message within "
                               f"{self._step_timeout:g} s; a rank hangs")
        if failure:
            raise failure[0]

    @property
    def worker_pids(self) -> list[int | None]:
        return [p.pid for p in self._procs]

    def watch(self, peers: dict[str, Any]) -> None:
        """Also end this engine's waits when one of ``peers`` (name -> process) exits: data-parallel replicas
        that share their experts wait inside collectives for each other's ranks, so another replica's dead
        rank means this one's will never answer."""
        self._peers = dict(peers)

    def _stop(self) -> None:
        if self._dead is None:
            self._finalizer()
            return
        # The engine died: the live ranks leave as soon as the ring closes, and a hung (stopped, spinning) one would
        # only run out both grace periods of a normal shutdown before being killed.
        stop = self._finalizer.detach()
        if stop is not None:
            _, func, args, kwargs = stop
            func(*args, **{**kwargs, "grace_s": DEAD_ENGINE_GRACE_S})
