"""Compiles request constraints off the engine loop, with a bounded cache and a deadline.

``compile`` is called on the caller's side of the engine (``LLMEngine.prepare_request``; ``AsyncLLM`` runs that
in a worker thread for constrained requests, so the event loop never waits on a compile either). Compiles run
on a small pool of their own threads: a compile that passes its deadline becomes a ``ValueError`` for that
request while the thread finishes in the background (xgrammar releases the GIL while it compiles), and a retry
of the same constraint waits on the same compile instead of starting another. The cache is LRU, bounded both in
entries and in the bytes the compiled grammars hold.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from llmctl.structured_output.backend import GrammarBackend, make_backend
from llmctl.structured_output.params import StructuredOutputsParams
from llmctl.structured_output.request_grammar import RequestGrammar

logger = logging.getLogger(__name__)

DEFAULT_COMPILE_TIMEOUT_S = 3.0
DEFAULT_CACHE_ENTRIES = 256
DEFAULT_CACHE_BYTES = 256 << 20
_COMPILE_THREADS = 2


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
        self._backend: GrammarBackend | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._cache_bytes = 0
        self._pending: dict[tuple, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    @property
    def backend(self) -> GrammarBackend:
        """Built on first use: the tokenizer scan takes a moment, and most engines never need it."""
        with self._lock:
            if self._backend is None:
                self._backend = make_backend(self.backend_name, self._tokenizer, self._vocab_size,
                                             self._stop_token_ids)
            return self._backend

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._cache), "bytes": self._cache_bytes, "pending": len(self._pending)}

    def compile(self, params: StructuredOutputsParams) -> Any:
        backend = self.backend
        key = params.cache_key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit[0]
            future = self._pending.get(key)
            if future is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="llmctl-grammar")
                future = self._pool.submit(backend.compile, params)
                self._pending[key] = future
                new = True
            else:
                new = False
        if new:  # outside the lock: a compile that is already done runs its callback right here
            future.add_done_callback(lambda f, k=key: self._finished(k, f))
        try:
            return future.result(timeout=self.compile_timeout)
        except FutureTimeout:
            raise ValueError(f"{params.where()}: compiling the {params.kind()} constraint took longer than "
                             f"{self.compile_timeout:g} s; simplify it") from None

    def _finished(self, key: tuple, future: Future) -> None:
        with self._lock:
            self._pending.pop(key, None)
            if future.cancelled() or future.exception() is not None:
                return
            compiled = future.result()
            size = self._backend.compiled_size(compiled) if self._backend is not None else 0
            self._cache[key] = (compiled, size)
            self._cache_bytes += size
            while self._cache and (len(self._cache) > self.max_cache_entries or
                                   self._cache_bytes > self.max_cache_bytes):
                _, (_, old_size) = self._cache.popitem(last=False)
                self._cache_bytes -= old_size

    def request_grammar(self, compiled: Any, params: StructuredOutputsParams) -> RequestGrammar:
        return RequestGrammar(self.backend.matcher(compiled), tuple(params.reasoning_end_token_ids or ()))

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
