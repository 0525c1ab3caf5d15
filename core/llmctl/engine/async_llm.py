"""The serving engine: the engine loop runs on its own thread and never blocks the asyncio event loop.

Callers get an async generator of cumulative ``RequestOutput``s per request. Validation and tokenization run
on the caller's side (so a bad request fails before it reaches the engine); everything that mutates engine
state runs on the engine thread, fed through a command queue. Outputs go back with one thread-safe callback
per step, and a consumer that falls behind simply skips to the newest cumulative output.

Once the engine has been idle for ``_TRIM_AFTER_IDLE_S`` after doing work, it calls glibc's ``malloc_trim(0)``
(then a few more times while it stays idle, for what the event loop frees after the last step;
``LLMCTL_MALLOC_TRIM=0`` turns it off). A step's temporaries are large and vary in size
(logits are rows x vocab floats: 48 MiB for 256 rows of a 49k vocab), and glibc keeps what they freed in the
engine thread's arena, so without it the idle RSS of a server steps up and down by up to ~100 MiB between bursts
(docs/reliability.md, memory). The call releases the GIL and takes a few milliseconds; it never runs while
requests are waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from llmctl.config import EngineArgs
from llmctl.engine.errors import EngineDeadError, RequestFailedError
from llmctl.engine.input_processor import PromptType
from llmctl.engine.llm_engine import LLMEngine, PreparedRequest
from llmctl.engine.malloc_tuning import limit_malloc_arenas, malloc_trim
from llmctl.lora.request import LoRARequest
from llmctl.outputs import RequestOutput
from llmctl.pooling.frontend import PreparedPooling
from llmctl.pooling.outputs import PoolingRequestOutput
from llmctl.pooling.params import PoolingParams
from llmctl.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_TRIM_AFTER_IDLE_S = 0.5
# After that first trim, trim again every ``_RETRIM_EVERY_S`` for ``_RETRIMS`` more times while the engine stays
# idle: the server's event loop goes on freeing after the engine's last step (streams of slow readers draining,
# abandoned connections closing, up to the 30 s stream write timeout), and those pages stayed resident until the
# next busy period (the soak's quiescent heap then read MiBs above glibc's in-use bytes: docs/reliability.md).
_RETRIM_EVERY_S = 0.5
_RETRIMS = 60
_HANDOFF_TIMEOUT_S = 0.005  # longest the engine waits for event loops to take a step's outputs


def _build_engine_off_main_thread(args: EngineArgs) -> LLMEngine:
    """Build the engine on a short-lived thread, so the caller's thread never runs an OpenMP parallel region.

    Why: libgomp gives every thread that opens a parallel region its own worker pool, and once a process holds
    more pool threads than CPUs it stops spinning between regions and parks workers on a futex instead. Loading
    the model on the caller's thread (weight packing runs OpenMP) left a second, idle pool behind, and every
    GEMM of the engine thread then paid a futex wake-up, which made a one-stream decode step about half again as
    slow (figures in docs/performance.md, "Measurements behind design choices"). A pool dies with its thread, so
    after this the engine thread owns the process's only pool.
    (Building on the engine thread itself would do too, but then loader garbage and step temporaries share one
    malloc arena, and the server's memory settled measurably later after load.)
    """
    result: dict[str, Any] = {}

    def build() -> None:
        try:
            result["engine"] = LLMEngine(args)
        except BaseException as exc:  # re-raised on the caller's thread
            result["error"] = exc

    loader = threading.Thread(target=build, name="llmctl-load", daemon=True)
    loader.start()
    loader.join()
    if "error" in result:
        raise result["error"]
    return result["engine"]


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    finished: bool = False


class AsyncLLM:
    def __init__(self, args: EngineArgs, engine: LLMEngine | None = None) -> None:
        if args.usage_context is None:  # an online engine: platforms pick latency defaults (vLLM's ENGINE_CONTEXT)
            args = dataclasses.replace(args, usage_context="engine_context")
        self.args = args
        limit_malloc_arenas()
        self.engine = engine if engine is not None else _build_engine_off_main_thread(args)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.runner_type: str = getattr(self.engine, "runner_type", "generate")
        self.pooling = getattr(self.engine, "pooling", None)  # the pooling frontend (tasks, limits), if pooling
        # the image processor (placeholder token, limit_mm_per_prompt) of a model that takes images, else None
        self.multimodal = getattr(self.engine, "multimodal", None)
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._stop = threading.Event()
        self.dead_error: BaseException | None = None
        self._stats: dict[str, Any] = self.engine.get_stats()
        self._thread = threading.Thread(target=self._run_loop, name="llmctl-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncLLM:
        return cls(args)

    # -- state -------------------------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.dead_error is None and not self._stop.is_set()

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    def check_health(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"engine loop died: {self.dead_error!r}")
        if not self._thread.is_alive():
            raise EngineDeadError("engine loop is not running")

    def get_stats(self) -> dict[str, Any]:
        """A snapshot taken by the engine thread after its latest step (never blocks on the engine)."""
        return dict(self._stats)

    def default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.engine.eos_token_ids

    def load_lora(self, lora_request: LoRARequest) -> None:
        """Read and check an adapter into the host cache (any thread); ``ValueError`` names what is wrong."""
        self.engine.load_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter for new requests; the running ones keep it until they finish."""
        return self.engine.remove_lora(lora_id)

    @property
    def num_unfinished(self) -> int:
        with self._streams_lock:
            return len(self._streams)

    # -- requests ----------------------------------------------------------------------------------------------
    def prepare(self, prompt: PromptType, params: SamplingParams | None, request_id: str,
                lora_request: LoRARequest | None = None) -> PreparedRequest:
        return self.engine.prepare_request(request_id, prompt, params, lora_request=lora_request)

    async def generate(self, prompt: PromptType | PreparedRequest, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, lora_request: LoRARequest | None = None
                       ) -> AsyncIterator[RequestOutput]:
        self.check_health()
        if isinstance(prompt, PreparedRequest):
            prepared = prompt
        else:
            request_id = request_id or f"req-{time.monotonic_ns()}"
            if lora_request is not None or (sampling_params is not None
                                            and sampling_params.structured_outputs is not None) or (
                    isinstance(prompt, dict) and prompt.get("multi_modal_data") is not None):
                # compiling a grammar, reading an adapter or preprocessing images can take a while: never on
                # the event loop
                prepared = await asyncio.to_thread(self.prepare, prompt, sampling_params, request_id, lora_request)
            else:
                prepared = self.prepare(prompt, sampling_params, request_id)
        rid = prepared.request_id
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._streams_lock:
            if rid in self._streams:
                raise ValueError(f"request_id: {rid!r} is already in use")
            self._streams[rid] = stream
        self._send("add", prepared)
        try:
            while True:
                item = await stream.queue.get()
                while not stream.queue.empty() and not _is_final(item):
                    item = stream.queue.get_nowait()  # skip to the newest cumulative output
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    stream.finished = True
                    errors = [c for c in item.outputs if c.finish_reason == "error"]
                    if errors and len(errors) == len(item.outputs):
                        raise RequestFailedError(rid, item.error or "failed in the engine")
                    yield item
                    return
                yield item
        finally:
            with self._streams_lock:
                self._streams.pop(rid, None)
            if not stream.finished:
                self._send("abort", rid)  # client went away or cancelled: free its KV blocks now

    async def encode(self, prompt: PromptType | PreparedPooling, pooling_params: PoolingParams | None = None,
                     request_id: str | None = None) -> AsyncIterator[PoolingRequestOutput]:
        """A pooling request (``runner="pooling"``): yields its one, final ``PoolingRequestOutput`` (vLLM's
        ``AsyncLLM.encode``). Validation errors raise here, before anything reaches the engine."""
        self.check_health()
        if isinstance(prompt, PreparedPooling):
            prepared = prompt
        else:
            request_id = request_id or f"pool-{time.monotonic_ns()}"
            prepared = self.engine.prepare_request(request_id, prompt,
                                                   pooling_params if pooling_params is not None else PoolingParams())
        rid = prepared.request_id
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._streams_lock:
            if rid in self._streams:
                raise ValueError(f"request_id: {rid!r} is already in use")
            self._streams[rid] = stream
        self._send("add", prepared)
        try:
            item = await stream.queue.get()
            stream.finished = True
            if isinstance(item, BaseException):
                raise item
            if item.error:
                raise RequestFailedError(rid, item.error)
            yield item
        finally:
            with self._streams_lock:
                self._streams.pop(rid, None)
            if not stream.finished:
                self._send("abort", rid)  # client went away or cancelled: free its KV blocks now

    async def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def _send(self, kind: str, payload: Any) -> None:
        self._commands.put((kind, payload))
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        stop_engine = getattr(self.engine, "shutdown", None)
        if stop_engine is not None and not self._thread.is_alive():  # not mid-step: stop its workers (mp), if any
            stop_engine()

    # -- the engine thread -------------------------------------------------------------------------------------
    def _run_loop(self) -> None:
        engine = self.engine
        trim_pending = False  # work was done since the last malloc_trim
        retrims_left, last_trim = 0, 0.0  # the later trims of this idle period
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not engine.has_unfinished_requests():
                    self._stats = engine.get_stats()
                    woken = self._wake.wait(timeout=_TRIM_AFTER_IDLE_S)
                    self._wake.clear()
                    if woken or malloc_trim is None:
                        continue
                    now = time.monotonic()
                    if trim_pending or (retrims_left and now - last_trim >= _RETRIM_EVERY_S):
                        retrims_left = _RETRIMS if trim_pending else retrims_left - 1
                        trim_pending, last_trim = False, now
                        malloc_trim(0)  # idle for a while: hand the step temporaries' free pages back
                    continue
                trim_pending = True
                outputs = engine.step()
                self._stats = engine.get_stats()
                if outputs:
                    self._deliver(outputs)
                del outputs  # not kept alive (with every RequestOutput of the last step) while idle
        except BaseException as exc:  # the engine itself is broken: fail everyone, loudly
            logger.exception("llmctl engine loop died")
            self.dead_error = exc
            self._fail_all(EngineDeadError(f"engine loop died: {type(exc).__name__}: {exc}"))
            return
        self._fail_all(EngineDeadError("engine is shut down"))

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_prepared(payload)
                except ValueError as exc:
                    self._deliver_one(payload.request_id, exc)
            elif kind == "abort":
                finals = self.engine.abort_request(payload)
                if finals:
                    self._deliver(finals)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._streams_lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        acks: list[threading.Event] = []
        for loop, items in by_loop.items():
            ack = threading.Event()
            try:
                loop.call_soon_threadsafe(_put_all, loop, items, ack)
                acks.append(ack)
            except RuntimeError:  # that event loop is closed; its consumers are gone
                pass
        # Hand the CPU to the consumers before the next step instead of alongside it. On a box with as many cores
        # as OpenMP threads, an event loop waking up in the middle of a step preempts one of the step's threads
        # and every GEMM barrier then waits for it (measured in docs/performance.md, "Measurements behind design
        # choices"; the consumers' own work is well under a millisecond).
        # Bounded, so a busy or stalled event loop never holds the engine back for long.
        deadline = time.monotonic() + _HANDOFF_TIMEOUT_S
        for ack in acks:
            ack.wait(max(0.0, deadline - time.monotonic()))

    def _deliver_one(self, request_id: str, item: Any) -> None:
        with self._streams_lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            except RuntimeError:
                pass

    def _fail_all(self, error: BaseException) -> None:
        with self._streams_lock:
            streams = list(self._streams.items())
        for rid, _stream in streams:
            self._deliver_one(rid, error)


def _put_all(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Any]], ack: threading.Event) -> None:
    for q, item in items:
        q.put_nowait(item)
    # The consumers woken above run in the loop's next iteration; this callback is queued behind them, so the
    # engine thread resumes once they have taken their outputs (and written them out).
    loop.call_soon(ack.set)


def _is_final(item: Any) -> bool:
    return isinstance(item, BaseException) or getattr(item, "finished", False)
