"""Run the app under uvicorn with llmctl's shutdown rules.

SIGTERM/SIGINT: the app turns to draining: the listener stays open and answers 503 (new requests and /health),
running requests get up to ``settings.shutdown_timeout`` seconds to finish, and any still running then get
``server shutting down`` (an SSE error event and ``[DONE]``, or a 503) instead of being cut; then uvicorn stops.
Exit code 0. A second signal skips the wait. Engine loop death: in-flight requests fail, the server stops, exit
code 1.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from types import FrameType
from typing import Any

import uvicorn

from llmctl_server.app import build_app
from llmctl_server.connections import protocol_class
from llmctl_server.engine_client import EngineClient
from llmctl_server.settings import ServerSettings

logger = logging.getLogger("llmctl_server")

EXIT_ENGINE_DEAD = 1
# After the deadline's "server shutting down" events: how long the streams get to write them before uvicorn stops.
SHUTDOWN_NOTICE_S = 2.0
DRAIN_POLL_S = 0.05


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self._llmctl_state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self._llmctl_state
        first = not state.draining
        state.draining = True
        if first and self._loop is not None and not self.should_exit:
            logger.info("shutting down: answering 503 to new requests, letting running ones finish (up to %.0fs)",
                        state.settings.shutdown_timeout)
            if sig == signal.SIGINT:
                self._captured_signals.append(sig)  # uvicorn re-raises it after the shutdown (exit 130)
            # Signal handlers run between bytecodes of the loop's own thread: hand the drain to the loop.
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        # A second signal (or one before the loop runs): stop now.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(state.shut_down_streams)
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after its graceful shutdown, which would end the process "killed by
        # SIGTERM"; a drained SIGTERM is an orderly stop and must exit 0 (SIGINT keeps uvicorn's behaviour).
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list) and sig == signal.SIGTERM:
            while signal.SIGTERM in captured:
                captured.remove(signal.SIGTERM)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Wait for the running requests (the listener still answers 503); at the deadline tell the rest."""
        state = self._llmctl_state
        deadline = time.monotonic() + state.settings.shutdown_timeout
        while state.in_flight and time.monotonic() < deadline and not self.should_exit:
            await asyncio.sleep(DRAIN_POLL_S)
        if state.in_flight:
            told = state.shut_down_streams()
            logger.warning("shutdown timeout (%.0fs) reached: %d request(s) still running were told 'server "
                           "shutting down'", state.settings.shutdown_timeout, told)
            notice_deadline = time.monotonic() + SHUTDOWN_NOTICE_S
            while state.in_flight and time.monotonic() < notice_deadline:
                await asyncio.sleep(DRAIN_POLL_S)
        self.should_exit = True


SWITCH_INTERVAL_S = 0.0005


def freeze_startup_heap() -> None:
    """Move every object alive after start-up (the model's modules, the tokenizer, the app) out of the collector's
    reach, as vLLM's server does before serving.

    Why: a full (oldest-generation) collection walks every tracked object while holding the GIL, so it stops the
    engine thread and the event loop together. With a model loaded that is a few hundred thousand objects that
    never die, and each such collection was a stall of every stream (docs/reliability.md, soak). What is frozen
    is never freed, which is what start-up objects are anyway.
    """
    gc.collect()
    gc.freeze()


def run_server(engine: EngineClient, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> int:
    """Serve until a signal or engine death; returns the process exit code. Does not shut the engine down."""
    # The engine loop is a thread of this process. When its Python work holds the GIL, the event loop waits up to
    # the switch interval (5 ms by default) for every hand-back, and one HTTP request takes many: a shorter
    # interval keeps /health and 503s fast while the engine is busy, for a negligible cost to the engine.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = build_app(engine, settings)
    state = app.state.llmctl
    freeze_startup_heap()
    # By the time uvicorn's own graceful shutdown starts, the drain above has ended every generation request;
    # what is left (a response being written) gets a few seconds.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), lifespan="on",
                            timeout_graceful_shutdown=int(SHUTDOWN_NOTICE_S) + 3,
                            http=protocol_class(settings.header_read_timeout, settings.max_idle_connections_per_client),
                            access_log=log_level.lower() == "debug", server_header=False)
    server = _Server(config, state)
    exit_code = 0

    def on_engine_dead() -> None:
        nonlocal exit_code
        exit_code = EXIT_ENGINE_DEAD
        state.draining = True
        server.should_exit = True

    app.state.on_engine_dead = on_engine_dead
    asyncio.run(server.serve())
    if exit_code == 0 and not server.started:
        exit_code = 1  # could not bind, or startup failed: uvicorn has logged why
    return exit_code
