"""Compiles request constraints off the engine loop, with a bounded cache and a deadline, and picks the grammar
engine for each constraint.

``compile`` is called on the caller's side of the engine (``LLMEngine.prepare_request``; ``AsyncLLM`` runs that
in a worker thread for constrained requests, so the event loop never waits on a compile either). Compiles run
on a small pool of their own threads: a compile that passes its deadline becomes a ``ValueError`` for that
request while the thread finishes in the background (xgrammar releases the GIL while it compiles), and a retry
of the same constraint waits on the same compile instead of starting another. The cache is LRU, bounded both in
entries and in the bytes the compiled grammars hold, and keyed by backend as well as constraint: a compiled
grammar only means something to the engine that built it, so each request's matcher comes from that engine.

``auto`` (the default, as in vLLM) is xgrammar, and llguidance for the constraints xgrammar refuses (features
its converters lack, or schema keywords it would not enforce): the compile that xgrammar refused is remembered
per constraint, so a repeated constraint goes straight to llguidance, and a constraint both refuse is refused
with xgrammar's reason. A deadline covers both attempts together; running out of time is never a reason to try
the other engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from llmctl.structured_output.backend import GrammarBackend, make_backend
from llmctl.structured_output.params import StructuredOutputsParams
from llmctl.structured_output.request_grammar import RequestGrammar

logger = logging.getLogger(__name__)

DEFAULT_COMPILE_TIMEOUT_S = 3.0
DEFAULT_CACHE_ENTRIES = 256
DEFAULT_CACHE_BYTES = 256 << 20
_COMPILE_THREADS = 2
_AUTO_ORDER = ("xgrammar", "guidance")


class CompileTimeout(ValueError):
    """The compile passed its deadline (a 400 like any refused constraint, but never a reason to fall back)."""


class _Deadline:
    """One request's time for compiling, across both engines under auto; building an engine (its tokenizer
    scan, once per engine) does not count."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())


@dataclass(frozen=True)
class CompiledGrammar:
    backend: str  # the engine that compiled it: only its matchers can run it
    grammar: Any


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...], backend: str = "auto",
                 compile_timeout: float = DEFAULT_COMPILE_TIMEOUT_S, max_cache_entries: int = DEFAULT_CACHE_ENTRIES,
                 max_cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.backend_name = backend
        self.compile_timeout = compile_timeout
        self.max_cache_entries = max_cache_entries
        self.max_cache_bytes = max_cache_bytes
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = stop_token_ids
        self._backends: dict[str, GrammarBackend] = {}
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._cache: OrderedDict[tuple, tuple[CompiledGrammar, int]] = OrderedDict()
        self._cache_bytes = 0
        # key -> (the compile, the field of the request that started it: its errors name that field)
        self._pending: dict[tuple, tuple[Future, str]] = {}
        # auto: constraints xgrammar refused -> its reason (bounded like the cache)
        self._fallbacks: OrderedDict[tuple, str] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def backend(self) -> GrammarBackend:
        """The engine this manager uses first (xgrammar under ``auto``)."""
        return self.get_backend(_AUTO_ORDER[0] if self.backend_name == "auto" else self.backend_name)

    def get_backend(self, name: str) -> GrammarBackend:
        """Built on first use: the tokenizer scan takes a moment, and most engines never need it."""
        backend = self._backends.get(name)
        if backend is None:
            with self._build_lock:  # not the cache's lock: cache hits go on while an engine is being built
                backend = self._backends.get(name)
                if backend is None:
                    backend = make_backend(name, self._tokenizer, self._vocab_size, self._stop_token_ids)
                    self._backends[name] = backend
        return backend

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._cache), "bytes": self._cache_bytes, "pending": len(self._pending),
                    "fallbacks": len(self._fallbacks)}

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        name = params.backend or self.backend_name
        deadline = _Deadline(self.compile_timeout)
        if name != "auto":
            return self._compile_with(name, params, deadline)
        key = params.cache_key()
        with self._lock:
            known = key in self._fallbacks
            if known:
                self._fallbacks.move_to_end(key)
        if known:
            return self._compile_with(_AUTO_ORDER[1], params, deadline)
        try:
            return self._compile_with(_AUTO_ORDER[0], params, deadline)
        except CompileTimeout:
            raise
        except ValueError as exc:
            refused = exc
        try:
            compiled = self._compile_with(_AUTO_ORDER[1], params, deadline)
        except CompileTimeout:
            raise
        except ValueError:
            raise refused from None
        self._remember_fallback(key, params, str(refused))
        return compiled

    def _remember_fallback(self, key: tuple, params: StructuredOutputsParams, reason: str) -> None:
        with self._lock:
            new = key not in self._fallbacks
            self._fallbacks[key] = reason
            while len(self._fallbacks) > self.max_cache_entries:
                self._fallbacks.popitem(last=False)
        if new:
            logger.info("structured output: %s falls back to guidance (llguidance); xgrammar refused it: %s",
                        params.where(), reason)

    def _compile_with(self, name: str, params: StructuredOutputsParams, deadline: _Deadline) -> CompiledGrammar:
        built = time.monotonic()
        backend = self.get_backend(name)
        deadline.at += time.monotonic() - built
        key = (name, params.cache_key())
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit[0]
            pending = self._pending.get(key)
            if pending is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="llmctl-grammar")
                future = self._pool.submit(lambda: CompiledGrammar(name, backend.compile(params)))
                owner = params.where()
                self._pending[key] = (future, owner)
                new = True
            else:
                (future, owner), new = pending, False
        if new:  # outside the lock: a compile that is already done runs its callback right here
            future.add_done_callback(lambda f, k=key, b=backend: self._finished(k, b, f))
        try:
            return future.result(timeout=deadline.remaining())
        except FutureTimeout:
            raise CompileTimeout(f"{params.where()}: compiling the {params.kind()} constraint took longer than "
                                 f"{self.compile_timeout:g} s; simplify it") from None
        except ValueError as exc:
            mine, text = params.where(), str(exc)
            if owner != mine and text.startswith(owner):  # a compile shared with a request that named it otherwise
                raise ValueError(mine + text[len(owner):]) from None
            raise

    def _finished(self, key: tuple, backend: GrammarBackend, future: Future) -> None:
        with self._lock:
            self._pending.pop(key, None)
            if future.cancelled() or future.exception() is not None:
                return
            compiled: CompiledGrammar = future.result()
            size = backend.compiled_size(compiled.grammar)
            self._cache[key] = (compiled, size)
            self._cache_bytes += size
            while self._cache and (len(self._cache) > self.max_cache_entries or
                                   self._cache_bytes > self.max_cache_bytes):
                _, (_, old_size) = self._cache.popitem(last=False)
                self._cache_bytes -= old_size

    def request_grammar(self, compiled: CompiledGrammar, params: StructuredOutputsParams) -> RequestGrammar:
        matcher = self.get_backend(compiled.backend).matcher(compiled.grammar)
        return RequestGrammar(matcher, tuple(params.reasoning_end_token_ids or ()))

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
