"""Run the app under uvicorn with llmctl's shutdown rules.

SIGTERM/SIGINT: the app turns to draining (new requests and /health get 503), uvicorn stops accepting
connections and lets running requests finish for up to ``settings.shutdown_timeout`` seconds; exit code 0.
Engine loop death: in-flight requests fail, the server stops, exit code 1.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn

from llmctl_server.app import build_app
from llmctl_server.settings import ServerSettings

logger = logging.getLogger("llmctl_server")

EXIT_ENGINE_DEAD = 1


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self._llmctl_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._llmctl_state.draining:
            logger.info("shutting down: refusing new requests, letting running ones finish (up to %.0fs)",
                        self._llmctl_state.settings.shutdown_timeout)
        self._llmctl_state.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after its graceful shutdown, which would end the process "killed by
        # SIGTERM"; a drained SIGTERM is an orderly stop and must exit 0 (SIGINT keeps uvicorn's behaviour).
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list) and sig == signal.SIGTERM:
            while signal.SIGTERM in captured:
                captured.remove(signal.SIGTERM)


SWITCH_INTERVAL_S = 0.0005


def run_server(engine: Any, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> int:
    """Serve until a signal or engine death; returns the process exit code. Does not shut the engine down."""
    # The engine loop is a thread of this process. When its Python work holds the GIL, the event loop waits up to
    # the switch interval (5 ms by default) for every hand-back, and one HTTP request takes many: a shorter
    # interval keeps /health and 503s fast while the engine is busy, for a negligible cost to the engine.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = build_app(engine, settings)
    state = app.state.llmctl
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), lifespan="on",
                            timeout_graceful_shutdown=max(1, int(round(settings.shutdown_timeout))),
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
