"""Helpers for the server tests: run ``build_app`` under a real uvicorn on a free localhost port."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn
from llmctl_server import ServerSettings, build_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free localhost ports (held open together while chosen, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LiveServer:
    url: str
    engine: Any
    app: Any
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def base(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(engine: Any, settings: ServerSettings | None = None) -> LiveServer:
    app = build_app(engine, settings or ServerSettings())
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", engine, app, server, thread)


def sse_events(raw: str) -> list[str]:
    """Split an SSE body into event payloads, asserting the framing is exactly ``data: ...\\n\\n``."""
    assert raw.endswith("\n\n"), raw[-50:]
    events = raw.split("\n\n")[:-1]
    payloads = []
    for ev in events:
        assert ev.startswith("data: "), ev[:80]
        assert "\n" not in ev, ev[:80]
        payloads.append(ev[len("data: "):])
    return payloads


def parse_stream(raw: str) -> list[dict[str, Any]]:
    payloads = sse_events(raw)
    assert payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


def wait_kv_free(engine: Any, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    stats = engine.get_stats()
    while time.monotonic() < deadline:
        stats = engine.get_stats()
        if stats["kv_blocks_free"] == stats["kv_blocks_total"] and not stats.get("num_running") and \
                not stats.get("num_waiting"):
            return stats
        time.sleep(0.05)
    raise AssertionError(f"KV blocks not freed: {stats}")
