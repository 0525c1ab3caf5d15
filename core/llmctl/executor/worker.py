"""One rank of the ``mp`` executor: a full ``EngineCore`` holding this rank's shard, stepped in lockstep with
the other ranks.

Every rank receives the same request changes in the same order and runs the same scheduler with the same seed,
so every rank schedules the same batch; the LM head gathers the full logits on every rank, so every rank samples
the same token and the ranks stay in step without the driver sending them a batch. Only rank 0 answers.

Under ``mp`` a rank reads the step messages from the driver's shared-memory ring (``llmctl.executor.shm_ring``)
and keeps its pipe for its answers. Between steps it sleeps on a doorbell pipe that only the driver writes; the
ring's closed flag, end-of-file on the doorbell and the ring's check of the driver's process end the wait, so it
never waits on a dead driver.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from llmctl.executor import messages as msg
from llmctl.executor import step_codec

logger = logging.getLogger(__name__)


def _exit_with_parent(parent_pid: int) -> None:
    """A worker must not outlive the driver: if the driver is killed, its pipe may never close while this rank
    waits inside a collective for a peer that is gone, so poll the parent and leave."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="llmctl-parent-watch", daemon=True).start()


def _bind_cpus(cpus: list[int] | None) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:  # a cpuset that changed under us: run unbound rather than not at all
            logger.warning("could not bind rank to CPUs %s: %s", cpus, exc)


class _Grammars:
    """Grammar matchers are not sent over the pipe (compiled grammars do not pickle); each rank compiles the
    request's constraint itself, with the tokenizer and stop ids the frontend used. The frontend already
    compiled it within its deadline, so the rank waits as long as it takes rather than diverge."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self._manager: Any = None

    def attach(self, request: Any) -> None:
        so = request.sampling_params.structured_outputs
        if so is None or request.pooling_params is not None:
            return
        if self._manager is None:
            from llmctl.loader.tokenizer import load_tokenizer
            from llmctl.structured_output.manager import StructuredOutputManager

            args = self.core.args
            tok = load_tokenizer(self.core.source, args.tokenizer, args.revision, args.trust_remote_code)
            eos = (*self.core.model_config.eos_token_ids,
                   *([tok.eos_token_id] if isinstance(getattr(tok, "eos_token_id", None), int) else []))
            self._manager = StructuredOutputManager(tok, self.core.model_config.vocab_size,
                                                    tuple(dict.fromkeys(eos)), args.structured_outputs_backend,
                                                    compile_timeout=3600.0)
        request.grammar = self._manager.request_grammar(self._manager.compile(so), so)


def _apply(core: Any, grammars: _Grammars, ops: list[msg.Op]) -> None:
    for op in ops:
        if op[0] == msg.ADD:
            for request in op[1]:
                grammars.attach(request)
                if request.lora is not None:  # the driver checked it; each rank reads its own slices (cached)
                    request.lora = core.lora.load(request.lora)
                core.add_request(request)
        elif op[0] == msg.ABORT:
            core.abort(op[1])
        elif op[0] == msg.FINISH:
            core.finish_request(op[1], op[2])
        else:
            raise ValueError(f"unknown worker op {op[0]!r}")


class RankEngine:
    """One rank's engine and the handling of the driver's messages, whichever transport carries them (a pipe
    under ``mp``, actor calls under Ray)."""

    def __init__(self, rank: int, world_size: int, init_method: str, args: Any,
                 data_parallel: Any = None) -> None:
        """``data_parallel``: a ``DataParallelAddress`` when the replicas share their experts."""
        from llmctl.engine.core import EngineCore
        from llmctl.tensor_parallel import RankAddress

        self.rank = rank
        self.core = EngineCore(args, RankAddress(rank, world_size, init_method, local_rank=rank,
                                                 data_parallel=data_parallel))
        self._grammars = _Grammars(self.core)

    def info(self) -> dict[str, Any] | None:
        """What the driver needs to stand in for the core (rank 0 only)."""
        if self.rank != 0:
            return None
        core = self.core
        return {"model_config": core.model_config, "cache_config": core.cache_config,
                "scheduler_config": core.scheduler_config, "runner_type": core.runner_type,
                "stats": core.get_stats(),
                "lora": None if core.lora is None else (core.lora.targets, core.lora.embedding_name, core.lora.dtype)}

    def handle_payload(self, payload: bytes | memoryview) -> tuple[Any, ...] | None:
        """Decode one step message (``llmctl.executor.step_codec``) and handle it."""
        known = getattr(getattr(self.core, "scheduler", None), "requests", None)
        kind, ops = step_codec.decode_step(payload, known)
        return self.handle(kind, ops)

    def handle(self, kind: str, ops: list[msg.Op]) -> tuple[Any, ...] | None:
        """Apply the request changes, step if asked; rank 0 returns ``(OK, outputs, stats)``."""
        _apply(self.core, self._grammars, ops)
        outputs = self.core.step() if kind == msg.STEP else []
        return (msg.OK, outputs, self.core.get_stats()) if self.rank == 0 else None

    def shutdown(self) -> None:
        self.core.shutdown()


class _Stop(Exception):
    """The driver asked this rank to stop, or is gone."""


def _ring_reader(ring: Any, doorbell: Connection) -> Any:
    """The next step message from the ring, sleeping on the doorbell pipe between steps."""
    from llmctl.executor.shm_ring import RingClosed, WriterGone, doorbell_block

    block = doorbell_block(doorbell.fileno())

    def next_payload() -> bytes:
        try:
            return ring.read(block=block)
        except RingClosed:
            raise _Stop from None
        except WriterGone:
            if ring.closed:  # the driver closed the ring, then its doorbells: an orderly stop
                raise _Stop from None
            # The driver died: nobody waits for this rank's teardown, and a full interpreter shutdown of a
            # loaded engine on a busy machine takes seconds (while the parent watch cannot get the GIL).
            logger.error("llmctl tensor-parallel rank: the driver is gone; exiting")
            os._exit(1)

    return next_payload


def _pipe_reader(conn: Connection) -> Any:
    def next_payload() -> bytes:
        try:
            return conn.recv_bytes()
        except EOFError:  # the driver is gone
            raise _Stop from None

    return next_payload


def run_worker(rank: int, world_size: int, init_method: str, args: Any, conn: Connection, parent_pid: int,
               cpus: list[int] | None, ring_name: str | None = None, doorbell: Connection | None = None,
               data_parallel: Any = None) -> None:
    """The ``mp`` worker process's entry point (spawned, so it imports nothing of the driver's state)."""
    _exit_with_parent(parent_pid)
    _bind_cpus(cpus)
    # Ctrl-C reaches the whole process group; the driver decides how the ranks stop (and stops them).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ring = None
    try:
        if ring_name is not None and doorbell is not None:
            from llmctl.executor.shm_ring import ShmRingReader

            ring = ShmRingReader(ring_name, rank)
        engine = RankEngine(rank, world_size, init_method, args, data_parallel)
    except BaseException as exc:
        conn.send(msg.error_message(exc))
        raise SystemExit(1) from None
    conn.send((msg.READY, engine.info()))
    next_payload = _pipe_reader(conn) if ring is None else _ring_reader(ring, doorbell)  # type: ignore[arg-type]
    try:
        while True:
            try:
                payload = next_payload()
            except _Stop:
                break
            known = getattr(getattr(engine.core, "scheduler", None), "requests", None)
            kind, ops = step_codec.decode_step(payload, known)
            if kind == msg.SHUTDOWN:
                break
            reply = engine.handle(kind, ops)
            if reply is not None:
                conn.send(reply)
    except BaseException as exc:
        logger.exception("llmctl tensor-parallel rank %d failed", rank)
        try:
            conn.send(msg.error_message(exc))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        engine.shutdown()
        if ring is not None:
            ring.close()
