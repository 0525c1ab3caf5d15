"""Turning validated OpenAI requests into engine requests, and engine outputs into OpenAI responses/chunks.

Each HTTP request runs its engine generators in producer tasks that feed one queue. The consumer (the JSON
handler or the SSE generator) only reads that queue, so three other parties can wake it without racing the
engine: the disconnect watcher (client went away: abort in the engine, free its KV blocks), the engine
watchdog (engine loop died: fail now rather than hang) and the producers themselves (output, error, done).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from typing import Any

import anyio
from starlette.requests import Request

from llmctl_server import protocol as p
from llmctl_server.chat_template import ChatRenderer
from llmctl_server.engine_client import EngineClient
from llmctl_server.errors import APIError, bad_request, sse_error_event, to_api_error, unavailable
from llmctl_server.metrics import Metrics
from llmctl_server.settings import ServerSettings
from llmctl_server.tokens import TokenText

logger = logging.getLogger("llmctl_server")


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


class EngineDead(Exception):
    """Raised into consumers by the watchdog when the engine loop has died."""


class ShuttingDown(Exception):
    """Raised into consumers when the shutdown drain's deadline has passed (launcher.py)."""


class Mailbox:
    """What a Run's producers hand its consumer: the newest output of each prompt, plus control items in order.

    Engine outputs are cumulative, so an output the consumer has not taken yet is superseded by the next one. Keeping
    only the newest per prompt bounds what a request holds while its client reads slowly (an unbounded queue of
    cumulative outputs, each carrying every token and logprob so far, grew by hundreds of MiB per stalled stream).
    Pending outputs are handed out before ``_Done``/``_Failed``, so a prompt's ``_Done`` always follows its last
    output; signals (client gone, engine dead, shutting down) go first, so a busy producer cannot starve them.
    """

    def __init__(self) -> None:
        self._outputs: dict[int, Any] = {}
        self._control: collections.deque[Any] = collections.deque()
        self._ready = asyncio.Event()

    def put_nowait(self, item: Any) -> None:
        if isinstance(item, tuple):
            self._outputs[item[0]] = item[1]
        elif isinstance(item, _Signal):
            self._control.appendleft(item)
        else:
            self._control.append(item)
        self._ready.set()

    def pending(self) -> int:
        return len(self._outputs) + len(self._control)

    async def get(self) -> Any:
        while True:
            if self._control and isinstance(self._control[0], _Signal):
                return self._control.popleft()
            if self._outputs:
                idx = next(iter(self._outputs))
                return idx, self._outputs.pop(idx)
            if self._control:
                return self._control.popleft()
            self._ready.clear()
            await self._ready.wait()


@dataclass
class _Done:
    prompt_idx: int


@dataclass
class _Failed:
    prompt_idx: int
    exc: BaseException


@dataclass
class _Signal:
    exc: BaseException


DEFAULT_QUEUE_LIMIT = 256  # when the engine does not tell its max_num_seqs


@dataclass
class ServerState:
    """Per-app state shared by the handlers, the watchdog and the launcher."""

    engine: EngineClient
    settings: ServerSettings
    metrics: Metrics
    renderer: ChatRenderer
    token_text: TokenText
    model_names: list[str]
    max_model_len: int
    vocab_size: int
    max_num_seqs: int | None
    in_flight: int = 0
    max_prompt_chars: int = 1 << 62  # set by build_app from the tokenizer and max_model_len (prompt_text.py)
    draining: bool = False
    engine_dead: bool = False
    active: dict[int, Mailbox] = field(default_factory=dict)
    tracer: Any = None  # a tracing.RequestTracer when --otlp-traces-endpoint is set
    loras: Any = None  # a lora_routes.LoRARegistry: adapters served by model name

    # -- health and admission ---------------------------------------------------------------------------------
    def engine_alive(self) -> bool:
        if self.engine_dead:
            return False
        try:
            return self.engine.is_running and not self.engine.errored
        except Exception:
            return False

    def mark_engine_dead(self) -> None:
        """Fail every in-flight request now (the engine should do so too; this bounds the wait)."""
        if self.engine_dead:
            return
        self.engine_dead = True
        logger.error("the engine loop has died; failing %d in-flight request(s)", len(self.active))
        for q in list(self.active.values()):
            q.put_nowait(_Signal(EngineDead()))

    def shut_down_streams(self) -> int:
        """The drain's deadline: every request still running gets ``server shutting down`` (an error event and
        ``[DONE]`` on a stream, a 503 otherwise) instead of being cut. Returns how many were told."""
        for q in list(self.active.values()):
            q.put_nowait(_Signal(ShuttingDown()))
        return len(self.active)

    def admit(self) -> None:
        """503 when the engine cannot take work, or when one more request would overflow the waiting queue."""
        if self.draining:
            raise unavailable("the server is shutting down", retry_after=self.settings.retry_after_seconds)
        if not self.engine_alive():
            raise unavailable("the inference engine is not running", retry_after=self.settings.retry_after_seconds)
        limit = self.queue_limit()
        capacity = self.max_num_seqs or 0
        # Admitted generation requests that the engine cannot run yet are the queue. Counted from the server's own
        # in-flight count, which is exact at admission time, and not from the engine's stats, which lag a burst by
        # a step (they made a burst of 24 admit 8 instead of running + queued = 12).
        full = self.in_flight >= capacity + limit
        if not full and self.in_flight > 0:
            # Requests with n > 1 or several prompts occupy more than one sequence: the engine's own waiting count
            # then shows a full queue before the request count does.
            try:
                waiting = int((self.engine.get_stats() or {}).get("num_waiting", 0))
            except Exception:
                waiting = 0
            full = waiting >= max(limit, 1)
        if full:
            raise unavailable(f"the request queue is full ({capacity} running + {limit} queued requests); retry later",
                              retry_after=self.settings.retry_after_seconds)

    def queue_limit(self) -> int:
        """``--max-queued-requests``, by default ``max_num_seqs``: at most ``max_num_seqs`` running plus as many
        queued, so a client waits at most about one batch's time before its request starts."""
        limit = self.settings.max_queued_requests
        if limit is not None:
            return limit
        return self.max_num_seqs if self.max_num_seqs is not None else DEFAULT_QUEUE_LIMIT

    def check_model(self, model: str | None) -> str:
        if model is None or model in self.model_names:
            return self.model_names[0] if model is None else model
        if self.loras is not None and model in self.loras.adapters:
            return model
        known = [*self.model_names, *(self.loras.adapters if self.loras is not None else ())]
        raise APIError(404, f"model {model!r} does not exist; available: {', '.join(known)}",
                       param="model", code="model_not_found")

    def lora_request(self, model: str) -> Any:
        """The adapter a (checked) model name selects, or None for the base model."""
        return None if self.loras is None else self.loras.request_for(model)


# -- building engine inputs -----------------------------------------------------------------------------------------
_SP_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
              "seed", "ignore_eos", "min_tokens", "include_stop_str_in_output", "skip_special_tokens",
              "prompt_logprobs")


def make_sampling_params(state: ServerState, req: p.SamplingFields, max_tokens: int, logprobs: int | None,
                         extra_args: dict[str, Any] | None = None) -> Any:
    """The model's defaults (generation_config) overridden by every field the client set."""
    from llmctl import SamplingParams

    try:
        base = state.engine.default_sampling_params()
    except Exception:
        base = SamplingParams()
    known = {f.name for f in fields(base)}
    changes: dict[str, Any] = {}
    for name in _SP_FIELDS:
        value = getattr(req, name)
        if value is not None and name in known:
            changes[name] = value
    changes.update(n=req.n, max_tokens=max_tokens, logprobs=logprobs, stop=req.stop_list(),
                   stop_token_ids=list(req.stop_token_ids or []))
    for name, value in (("logit_bias", req.logit_bias_ids()), ("allowed_token_ids", req.allowed_token_ids),
                        ("bad_words", req.bad_words)):
        if value is not None and name in known:
            changes[name] = value
    if extra_args:
        changes["extra_args"] = dict(extra_args)
    try:
        return base.clone(**changes)
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def resolve_max_tokens(state: ServerState, n_prompt: int, requested: int | None, field_name: str) -> int:
    """Check the prompt against the context length and give ``max_tokens`` (defaulting to what is left)."""
    limit = state.max_model_len
    if n_prompt >= limit:
        raise bad_request(f"prompt: {n_prompt} prompt tokens leave no room to generate within the context length "
                          f"{limit}", param="prompt", code="context_length_exceeded")
    if requested is None:
        cap = getattr(state.engine.model_config, "max_new_tokens", None)  # an encoder-decoder's decoder positions
        return limit - n_prompt if cap is None else min(limit - n_prompt, cap)
    if n_prompt + requested > limit:
        raise bad_request(f"{field_name}: {n_prompt} prompt tokens + {field_name} {requested} = "
                          f"{n_prompt + requested} exceeds the context length {limit}", param=field_name,
                          code="context_length_exceeded")
    return requested


@dataclass
class PreparedPrompt:
    text: str
    ids: list[int]
    mm_data: dict[str, Any] | None = None  # {"image": [PIL images]}, already fetched and decoded


# -- running ----------------------------------------------------------------------------------------------------------
class Run:
    """The engine requests of one HTTP request, their producers, and the queue that joins them."""

    def __init__(self, state: ServerState, http_request: Request, request_id: str, lora_request: Any = None) -> None:
        self.state = state
        self.lora_request = lora_request
        self.http = http_request
        self.request_id = request_id
        self.queue = Mailbox()
        self.tasks: list[asyncio.Task] = []
        self.engine_ids: list[str] = []
        self.unfinished: set[str] = set()
        self.arrival = time.monotonic()
        self._registered = False
        self._watcher: asyncio.Task | None = None

    def start(self, prompts: list[PreparedPrompt], params: list[Any]) -> None:
        st = self.state
        st.in_flight += 1
        st.active[id(self)] = self.queue
        self._registered = True
        for i, pp in enumerate(prompts):
            rid = self.request_id if len(prompts) == 1 else f"{self.request_id}-{i}"
            self.engine_ids.append(rid)
            self.unfinished.add(rid)
            prompt = {"prompt_token_ids": pp.ids, "prompt": pp.text}
            if pp.mm_data:
                prompt["multi_modal_data"] = pp.mm_data
            self.tasks.append(asyncio.create_task(self._produce(i, rid, prompt, params[i])))
        self._watcher = asyncio.create_task(self._watch_disconnect())

    async def _produce(self, idx: int, rid: str, prompt: dict[str, Any], params: Any) -> None:
        try:
            extra = {} if self.lora_request is None else {"lora_request": self.lora_request}
            async for out in self.state.engine.generate(prompt, params, rid, **extra):
                if out.finished:
                    self.unfinished.discard(rid)
                self.queue.put_nowait((idx, out))
            self.unfinished.discard(rid)
            self.queue.put_nowait(_Done(idx))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # reported to the consumer, which owns error handling
            self.unfinished.discard(rid)
            self.queue.put_nowait(_Failed(idx, exc))

    async def _watch_disconnect(self) -> None:
        try:
            while True:
                message = await self.http.receive()
                if message["type"] == "http.disconnect":
                    break
        except Exception:
            return
        if self.unfinished:
            logger.info("client disconnected; aborting %s", self.request_id)
            await self._abort_unfinished()
            self.queue.put_nowait(_Signal(ClientGone()))

    async def _abort_unfinished(self) -> None:
        for rid in list(self.unfinished):
            try:
                await self.state.engine.abort(rid)
            except Exception as exc:  # aborting a request the engine already dropped is fine
                logger.debug("abort %s: %s", rid, exc)
            # Counted here so that requests in = finished (any reason, abort included) + rejected on /metrics.
            self.state.metrics.finished.labels(reason="abort").inc()
        self.unfinished.clear()

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, cumulative RequestOutput) until every prompt is done; raises the first failure."""
        remaining = len(self.tasks)
        while remaining:
            item = await self.queue.get()
            if isinstance(item, tuple):
                yield item
            elif isinstance(item, _Done):
                remaining -= 1
            elif isinstance(item, (_Failed, _Signal)):
                exc, item = item.exc, None
                try:
                    raise exc
                finally:
                    del exc  # this frame lives on in exc's traceback: holding exc too would make a cycle

    async def close(self) -> None:
        """Always called: abort what is still running in the engine and release the admission slot. Shielded:
        it often runs while the response task is being cancelled (client gone), and the abort must still
        happen or the request would keep its KV blocks."""
        with anyio.CancelScope(shield=True):
            await self._close()

    async def _close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for t in self.tasks:
            if not t.done():
                t.cancel()
        if self.unfinished:
            await self._abort_unfinished()
        for t in self.tasks:
            with contextlib.suppress(BaseException):
                await t
        if self._registered:
            self._registered = False
            self.state.in_flight -= 1
            self.state.active.pop(id(self), None)
        # A cancelled task keeps its CancelledError, whose traceback holds the task's frames, whose ``self`` is this
        # Run: with the tasks kept here too, every closed request was a reference cycle (Run, its mailbox and last
        # outputs, the HTTP request's scope and transport) that only a full collection freed. Those collections then
        # walked thousands of objects with the GIL held, stalling every stream (docs/reliability.md, round three).
        self._watcher = None
        self.tasks = []


CLIENT_CLOSED = 499  # nginx's "client closed request": not a server error, so 5xx alerts stay meaningful


def translate(exc: BaseException) -> BaseException:
    """Internal signals -> what the client is told."""
    if isinstance(exc, EngineDead):
        return unavailable("the inference engine stopped while processing this request", retry_after=5)
    if isinstance(exc, ShuttingDown):
        return unavailable("server shutting down", retry_after=5)
    if isinstance(exc, ClientGone):
        return APIError(CLIENT_CLOSED, "the client closed the connection", code="client_closed_request")
    return exc


class Recorder:
    """Latency/token metrics of one HTTP request."""

    def __init__(self, metrics: Metrics, arrival: float) -> None:
        self.m = metrics
        self.arrival = arrival
        self.first: float | None = None
        self.last: float | None = None
        self.tokens_seen: dict[tuple[int, int], int] = {}

    def observe(self, key: tuple[int, int], num_tokens: int) -> None:
        new = num_tokens - self.tokens_seen.get(key, 0)
        if new <= 0:
            return
        self.tokens_seen[key] = num_tokens
        t = time.monotonic()
        if self.first is None:
            self.first = t
            self.m.ttft.observe(t - self.arrival)
        elif self.last is not None:
            gap = (t - self.last) / new
            for _ in range(min(new, 64)):
                self.m.itl.observe(gap)
        self.last = t

    def finish(self, prompt_tokens: int, reasons: list[str | None], outputs: list[Any] | None = None) -> None:
        """``outputs``: the final ``RequestOutput`` of each engine request (their engine-side timestamps give the
        queue, prefill and decode times)."""
        self.m.e2e.observe(time.monotonic() - self.arrival)
        self.m.prompt_tokens.inc(prompt_tokens)
        self.m.generation_tokens.inc(sum(self.tokens_seen.values()))
        for r in reasons:
            self.m.finished.labels(reason=r or "unknown").inc()
        for out in outputs or []:
            self.m.observe_request_times(getattr(out, "metrics", None))
            self.m.request_prompt_tokens.observe(len(getattr(out, "prompt_token_ids", None) or []))
            self.m.request_generation_tokens.observe(sum(len(o.token_ids) for o in getattr(out, "outputs", [])))


# -- response assembly ---------------------------------------------------------------------------------------------
@dataclass
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Any]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # streaming progress
    sent_chars: int = 0
    sent_tokens: int = 0
    started: bool = False
    done: bool = False


def completion_logprobs(tt: TokenText, token_ids: list[int], positions: list[dict[int, Any] | None],
                        k: int, offset: int) -> p.CompletionLogprobs:
    out = p.CompletionLogprobs()
    for tid, pos in zip(token_ids, positions, strict=False):
        token = tt.text(tid, pos)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if pos is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        lp = pos.get(tid)
        out.token_logprobs.append(float(lp.logprob) if lp is not None else None)
        top: dict[str, float] = {}
        for t_id, entry in tt.ranked(pos, k):
            top[tt.text(t_id, pos)] = float(entry.logprob)
        if lp is not None:
            top.setdefault(token, float(lp.logprob))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(tt: TokenText, token_ids: list[int], positions: list[dict[int, Any]], k: int) -> p.ChatLogprobs:
    content = []
    for tid, pos in zip(token_ids, positions, strict=False):
        lp = pos.get(tid)
        tops = [p.TopLogprob(token=tt.text(t, pos), logprob=float(e.logprob), bytes=tt.bytes(t))
                for t, e in tt.ranked(pos, k)]
        content.append(p.ChatLogprobToken(token=tt.text(tid, pos), logprob=float(lp.logprob) if lp else -9999.0,
                                          bytes=tt.bytes(tid), top_logprobs=tops))
    return p.ChatLogprobs(content=content)


def prompt_logprobs_entries(tt: TokenText, positions: list[dict[int, Any] | None] | None,
                            num_prompt_tokens: int) -> p.PromptLogprobs:
    """The engine's prompt logprobs in vLLM's response shape, one entry per prompt token."""
    out: p.PromptLogprobs = []
    for pos in list(positions or [])[:num_prompt_tokens]:
        if pos is None:
            out.append(None)
            continue
        out.append({tid: p.PromptLogprob(logprob=float(e.logprob), rank=e.rank, decoded_token=tt.text(tid, pos))
                    for tid, e in pos.items()})
    out += [None] * (num_prompt_tokens - len(out))
    return out


def check_prompt_logprobs(body: p.SamplingFields) -> None:
    """As vLLM: prompt logprobs come whole in the response, so a stream cannot carry them."""
    if body.prompt_logprobs is not None and body.stream:
        raise bad_request("prompt_logprobs: not available when stream=true", param="prompt_logprobs")


def sse(obj: Any) -> str:
    data = obj.model_dump(exclude_none=False) if hasattr(obj, "model_dump") else obj
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def first_event(run: Run) -> tuple[AsyncIterator[tuple[int, Any]], tuple[int, Any] | None]:
    """Wait for the first output before answering, so that errors the engine raises on submission (and a dead
    engine) still get a proper HTTP status instead of an error inside a 200 stream."""
    it = run.events().__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None
    return it, first


async def _chain(first: tuple[int, Any] | None, rest: AsyncIterator[tuple[int, Any]]) -> AsyncIterator[tuple[int, Any]]:
    if first is not None:
        yield first
    async for ev in rest:
        yield ev


async def stream_with_errors(body: AsyncIterator[str], run: Run) -> AsyncIterator[str]:
    """The SSE body: chunks, then ``[DONE]``; a failure mid-stream becomes one sanitised error event."""
    try:
        async for chunk in body:
            yield chunk
    except ClientGone:
        return
    except BaseException as exc:
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            raise
        yield sse_error_event(translate(exc))
    finally:
        await run.close()
    yield SSE_DONE


def api_error_from(exc: BaseException) -> APIError:
    return to_api_error(translate(exc))
