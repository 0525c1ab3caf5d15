"""The server freezes its start-up heap, so full collections during serving do not walk the loaded model."""

from __future__ import annotations

import gc
import threading
import time

import httpx
from llmctl import AsyncLLM, EngineArgs
from llmctl_server import ServerSettings
from llmctl_server.launcher import run_server

from tests.test_server_support import free_port


def test_run_server_freezes_the_start_up_heap(tiny_llama_dir):
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(tiny_llama_dir), kv_cache_memory=16 << 20))
    probe = object.__new__(type("StartUpProbe", (), {}))  # a tracked object alive before the server starts
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    port = free_port()
    settings = ServerSettings(engine_poll_interval=0.1)
    server: dict = {}
    t = threading.Thread(target=lambda: server.setdefault("rc", run_server(engine, settings, port=port,
                                                                           log_level="warning")))
    t.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        frozen = gc.get_freeze_count()
        tracked = {id(o) for o in gc.get_objects()}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        engine.shutdown()
        t.join(30)
        gc.unfreeze()
    assert frozen > 1000, "start-up objects (model, tokenizer, app) must be frozen"
    assert id(probe) not in tracked, "an object alive at start-up is still walked by every full collection"
