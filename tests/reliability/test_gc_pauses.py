"""The server freezes its start-up heap, so full collections during serving do not walk the loaded model."""

from __future__ import annotations

import gc
import threading
import time

import httpx
from llmctl import AsyncLLM, EngineArgs
from llmctl_server import ServerSettings
from llmctl_server.launcher import run_server

from tests.reliability.conftest import build_engine
from tests.test_server_support import free_port, start_server


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


def _cyclic_garbage_types() -> set[str]:
    """Type names of what only the cyclic collector can free, collected now (gc must be disabled before)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return {type(o).__qualname__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_served_requests_leave_no_reference_cycles(tiny_llama_dir):
    """A request's objects are freed when it ends, not at the next full collection: every cycle left behind is walked
    by a collection that stops all streams, and holds the request's outputs (and the step's tensors) until then."""
    engine = build_engine(tiny_llama_dir)
    srv = start_server(engine, ServerSettings(served_model_names=["tiny"]))
    state = srv.app.state.llmctl
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 6, "ignore_eos": True}
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.post("/v1/completions", json=body).status_code == 200  # warm-up: lazy imports, caches
            gc.collect()
            gc.disable()
            r = c.post("/v1/completions", json={**body, "n": 2, "logprobs": 2})
            assert r.status_code == 200, r.text
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:  # read to the end
                assert sum(1 for line in s.iter_lines() if line.startswith("data:")) > 2
            with c.stream("POST", "/v1/completions", json={**body, "stream": True, "max_tokens": 200}) as s:
                next(s.iter_lines())  # hang up mid-stream: the server cancels the request's tasks
        deadline = time.monotonic() + 30
        while (state.in_flight or engine.engine.has_unfinished_requests()) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        leftovers = _cyclic_garbage_types() & {"Run", "Mailbox", "RequestOutput", "AttentionMetadata", "_Plan"}
    finally:
        gc.enable()
        srv.stop()
        engine.shutdown()
    assert not leftovers, f"finished requests left reference cycles of {sorted(leftovers)}"


def test_a_running_requests_logprobs_are_not_walked_by_full_collections(tiny_llama_dir):
    """A request with n=16 and logprobs=20 holds 21 logprobs per position per sequence while it runs: were they
    tracked, every full collection during serving would walk all of them (the soak's gen-2 pauses), with the
    engine thread and the event loop stopped."""
    from llmctl import LLM, SamplingParams

    llm = LLM(model=str(tiny_llama_dir), kv_cache_memory=16 << 20, num_threads=1, seed=0)
    out = llm.generate(["hello there"], SamplingParams(n=4, logprobs=5, max_tokens=8, temperature=1.0,
                                                       ignore_eos=True), use_tqdm=False)[0]
    positions = [pos for c in out.outputs for pos in c.logprobs]
    entries = [lp for pos in positions for lp in pos.values()]
    assert len(positions) == 4 * 8 and len(entries) >= 4 * 8 * 5
    gc.collect()
    assert not any(gc.is_tracked(lp) for lp in entries), "Logprob entries are walked by every collection"
    assert not any(gc.is_tracked(pos) for pos in positions), "a position's dict of logprobs stays tracked"
    assert entries[0].logprob <= 0 and isinstance(entries[0].decoded_token, str)
