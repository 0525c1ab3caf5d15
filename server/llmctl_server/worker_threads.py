"""The server's worker threads, all started and warmed at start-up.

Tokenizing, chat rendering and the engine's input preparation run through ``asyncio.to_thread``, on the event loop's
default executor. asyncio's own starts its threads lazily, one more only when calls overlap beyond the idle ones,
up to min(32, CPUs + 4): a long-running server grew by a few MiB (a thread's stack and what a thread's first calls
leave resident) whenever its load first reached a new level of overlap, long after start-up, which a memory bound
measured after a warm-up counts as growth. This pool has the same size, and every thread is started, and has
tokenized once, before the first request: that memory is there from start-up and never arrives mid-run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0


def default_worker_count() -> int:
    """asyncio's default executor size."""
    return min(32, (os.cpu_count() or 1) + 4)


def start_worker_threads(loop: asyncio.AbstractEventLoop, warm: Callable[[], object] | None = None,
                         count: int | None = None) -> ThreadPoolExecutor:
    """Make ``loop``'s default executor a pool of ``count`` threads, every one started now and having run ``warm``
    once. Each start-up task holds its thread at a barrier until all have one, so the pool cannot hand two of them
    to one thread."""
    count = count or default_worker_count()
    pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="llmctl-worker")
    barrier = threading.Barrier(count)

    def start() -> None:
        if warm is not None:
            warm()
        barrier.wait(START_TIMEOUT_S)

    futures = [pool.submit(start) for _ in range(count)]
    try:
        for f in futures:
            f.result(START_TIMEOUT_S + 5)
    except (threading.BrokenBarrierError, TimeoutError) as exc:  # the pool still works, only later threads start late
        logger.warning("llmctl server: worker threads not all started at start-up (%s)", exc)
    loop.set_default_executor(pool)
    return pool
