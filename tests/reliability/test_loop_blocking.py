"""Large non-streamed answers (n > 1, logprobs) are built off the event loop, so other streams keep flowing."""

from __future__ import annotations

import threading

import httpx
import pytest
from llmctl_server import ServerSettings
from llmctl_server import app as app_module

from tests.reliability.conftest import build_engine
from tests.test_server_support import start_server


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "hello there", "n": 3, "max_tokens": 4, "logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True,
                              "top_logprobs": 2}),
])
def test_logprobs_answer_is_built_in_a_worker_thread(tiny_llama_dir, monkeypatch, route, body):
    threads: list[str] = []
    name = "completion_logprobs" if route == "/v1/completions" else "chat_logprobs"
    real = getattr(app_module, name)

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(app_module, name, spy)
    engine = build_engine(tiny_llama_dir)
    srv = start_server(engine, ServerSettings(served_model_names=["tiny"]))
    try:
        r = httpx.post(srv.url + route, json={"model": "tiny", **body}, timeout=60)
        assert r.status_code == 200, r.text
        assert all(c["logprobs"] for c in r.json()["choices"])
    finally:
        srv.stop()
        engine.shutdown()
    assert threads, "the logprobs of the answer were not built"
    loop_thread = srv.thread.name  # uvicorn's event loop runs on the server thread
    assert loop_thread not in threads, f"built on the event loop's thread ({threads})"
