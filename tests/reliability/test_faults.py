"""Faults: a failing forward or detokenizer fails only its request; a dead engine loop fails everything, turns
/health 503 and ends the process non-zero; SIGTERM under load drains and exits 0 with no orphans."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import httpx
import pytest
from llmctl.engine.output_processor import OutputProcessor
from llmctl_server import ServerSettings

from tests.reliability.conftest import build_engine, children_of, metric_sum, record, scaled
from tests.test_server_support import parse_stream, start_server, wait_kv_free

DETOK_MARKER = "DETOKENIZER-BOOM"


@pytest.fixture()
def faulty(tiny_llama_dir, monkeypatch):
    """An in-process server whose engine has fault injection on, and whose detokenizer raises for any prompt that
    contains DETOK_MARKER (patched where the output processor creates each sequence's detokenizer)."""
    real_add = OutputProcessor.add

    def add(self, request_id, prompt, prompt_token_ids, params, child_ids, arrival_time):
        real_add(self, request_id, prompt, prompt_token_ids, params, child_ids, arrival_time)
        if prompt and DETOK_MARKER in prompt:
            for seq in self.parents[request_id].sequences:
                def boom(*_a, **_k):
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer failure")
                seq.detok.add_tokens = boom

    monkeypatch.setattr(OutputProcessor, "add", add)
    engine = build_engine(tiny_llama_dir, fault_injection=True)
    srv = start_server(engine, ServerSettings(served_model_names=["tiny"]))
    yield srv
    srv.stop()
    engine.shutdown()


@pytest.mark.parametrize("fault", ["forward", "detokenizer"])
async def test_fault_fails_only_that_request(faulty, fault):
    good_body = {"model": "tiny", "prompt": "A healthy neighbour", "max_tokens": 30, "ignore_eos": True,
                 "temperature": 0}
    bad_body = {"model": "tiny", "prompt": f"{DETOK_MARKER} please", "max_tokens": 30, "ignore_eos": True}
    if fault == "forward":
        bad_body = {"model": "tiny", "prompt": "boom", "max_tokens": 30, "extra_args": {"inject_fault": "forward"}}
    rounds = scaled(3, 20)
    async with httpx.AsyncClient(base_url=faulty.url, timeout=60) as c:
        for _ in range(rounds):
            goods = [c.post("/v1/completions", json=good_body) for _ in range(3)]
            bad = c.post("/v1/completions", json=bad_body)
            stream_bad = c.post("/v1/completions", json={**bad_body, "stream": True})
            *good_rs, bad_r, sbad_r = await asyncio.wait_for(asyncio.gather(*goods, bad, stream_bad), 60)
            for r in good_rs:
                assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
            assert bad_r.status_code == 500, bad_r.text
            err = bad_r.json()["error"]
            assert err["code"] == "request_failed" and "Traceback" not in err["message"]
            if sbad_r.status_code == 200:
                events = parse_stream(sbad_r.text)
                assert "error" in events[-1]
            else:
                assert sbad_r.status_code == 500
    assert httpx.get(faulty.url + "/health").status_code == 200
    wait_kv_free(faulty.engine)
    record(f"fault_{fault}", rounds=rounds, failed_requests=2 * rounds, healthy_neighbours=3 * rounds)


async def _stream_until_error(url: str, i: int) -> tuple[float, str]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        body = {"model": "tiny", "prompt": f"in flight {i}", "max_tokens": 400, "ignore_eos": True,
                "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            last = ""
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    last = line[6:]
                    if last != "[DONE]" and "error" in json.loads(last):
                        return time.monotonic(), last
        return time.monotonic(), last


def test_engine_loop_killed(server_factory, tiny_llama_dir, tmp_path):
    die = tmp_path / "die"
    srv = server_factory(tiny_llama_dir, "--die-file", str(die), "--shutdown-timeout", "30")
    n = 8

    async def scenario():
        tasks = [asyncio.create_task(_stream_until_error(srv.url, i)) for i in range(n)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = httpx.get(srv.url + "/metrics", timeout=5).text
            if re.search(rf"^llmctl_num_requests_running(\{{[^}}]*\}})? {float(n)}$", m, flags=re.M):
                break
            await asyncio.sleep(0.05)
        die.touch()
        t_kill = time.monotonic()
        health = []
        while time.monotonic() - t_kill < 5 and srv.proc.poll() is None:
            try:
                health.append(httpx.get(srv.url + "/health", timeout=1).status_code)
            except httpx.HTTPError:
                health.append("closed")
            if 503 in health:
                break
            await asyncio.sleep(0.01)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return t_kill, results, health

    t_kill, results, health = asyncio.run(scenario())
    latest = max(t for t, _ in results) - t_kill
    for _, last in results:
        assert "error" in last, last
        assert "Traceback" not in last and "killed by the reliability test" not in last
    rc = srv.proc.wait(15)
    record("engine_loop_killed", in_flight=n, slowest_error_s=round(latest, 2), health=health[-1], exit_code=rc)
    assert latest < 5
    assert 503 in health, health
    assert rc != 0


def _wait_running(srv, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric_sum(srv.metrics(), "llmctl_num_requests_running") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{n} requests never ran at once")


async def _streams(url: str, n: int, max_tokens: int) -> list[asyncio.Task]:
    async def one(i):
        body = {"model": "tiny", "prompt": f"drain me {i}", "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True, "temperature": 0}
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            r = await c.post("/v1/completions", json=body)
            return r.status_code, r.text, time.monotonic()

    return [asyncio.create_task(one(i)) for i in range(n)]


def test_sigterm_under_load(server_factory, tiny_llama_dir, tmp_path):
    """The drain: the listener answers 503 while running streams finish. The steps are slowed (stall file) until
    the late requests have been answered, so the streams are still running then on any machine."""
    stall = tmp_path / "stall"
    stall.touch()
    srv = server_factory(tiny_llama_dir, "--shutdown-timeout", "120", "--stall-file", str(stall))
    n = scaled(16, 64)

    async def scenario():
        tasks = await _streams(srv.url, n, 120)
        await asyncio.to_thread(_wait_running, srv, n)
        kids = children_of(srv.pid)
        srv.proc.send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        await asyncio.sleep(0.2)
        late = []
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
            for _ in range(3):
                late.append((await c.post("/v1/completions", json={"model": "tiny", "prompt": "x"})).status_code)
            late.append((await c.get("/health")).status_code)
        stall.unlink()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return t_term, kids, late, results

    t_term, kids, late, results = asyncio.run(scenario())
    for status, text, _ in results:
        assert status == 200
        events = parse_stream(text)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert late == [503, 503, 503, 503], late
    rc = srv.proc.wait(60)
    exit_s = time.monotonic() - t_term
    alive = [k for k in kids if _alive(k)]
    record("sigterm_under_load", in_flight=n, late_requests=late, exit_code=rc, exit_seconds=round(exit_s, 1),
           children_before=len(kids), orphans=len(alive))
    assert rc == 0
    assert not alive, alive
    assert "Traceback" not in srv.output()


def test_sigterm_deadline_tells_streams(server_factory, tiny_llama_dir, tmp_path):
    """Streams that cannot finish within --shutdown-timeout (held by the stall file) end with a 'server shutting
    down' error event and [DONE], not a cut connection, and not before the timeout."""
    stall = tmp_path / "stall"
    stall.touch()
    timeout_s = 2.0
    srv = server_factory(tiny_llama_dir, "--shutdown-timeout", str(timeout_s), "--stall-file", str(stall))
    n = 8

    async def scenario():
        tasks = await _streams(srv.url, n, 400)
        await asyncio.to_thread(_wait_running, srv, n)
        srv.proc.send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        return t_term, await asyncio.wait_for(asyncio.gather(*tasks), 120)

    t_term, results = asyncio.run(scenario())
    ended = []
    for status, text, t_end in results:
        assert status == 200
        events = parse_stream(text)  # asserts the final [DONE]
        assert events[-1]["error"]["message"] == "server shutting down", events[-1]
        assert events[-1]["error"]["code"] == "service_unavailable"
        ended.append(t_end - t_term)
    rc = srv.proc.wait(60)
    record("sigterm_deadline", streams=n, shutdown_timeout_s=timeout_s, ended_after_s=round(min(ended), 2),
           exit_code=rc)
    assert min(ended) >= timeout_s - 0.1, ended  # the drain waited the whole timeout
    assert rc == 0
    out = srv.output()
    assert "CancelledError" not in out and "Traceback" not in out, out[-2000:]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_plugin_fault_during_serving(tiny_llama_dir):
    """The attention backend (a plugin's op) raises for every prefill of 24+ tokens, in the middle of a busy
    engine: those requests fail with a clean 500 / error event, their short neighbours (batched with them, then
    retried one at a time by the engine) complete, KV is freed, and the server stays healthy."""
    engine = build_engine(tiny_llama_dir)
    backends = {type(m.backend) for m in engine.engine.core.model.modules() if hasattr(m, "backend")}
    assert len(backends) == 1
    cls = backends.pop()
    real_forward = cls.forward

    def faulty_forward(self, query, kv_cache, metadata, *args, **kw):
        if metadata.max_query_len >= 24:
            raise RuntimeError("injected plugin kernel failure")
        return real_forward(self, query, kv_cache, metadata, *args, **kw)

    srv = start_server(engine, ServerSettings(served_model_names=["tiny"]))
    try:
        cls.forward = faulty_forward
        long_prompt = " ".join(["stone"] * 40)

        async def scenario():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                shorts = [c.post("/v1/completions", json={"model": "tiny", "prompt": f"ok {i}", "max_tokens": 20,
                                                          "ignore_eos": True}) for i in range(6)]
                longs = [c.post("/v1/completions", json={"model": "tiny", "prompt": long_prompt, "max_tokens": 8,
                                                         "stream": i % 2 == 0}) for i in range(4)]
                return await asyncio.gather(*shorts, *longs)

        rs = asyncio.run(scenario())
        for r in rs[:6]:
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text[:300]
        for r in rs[6:]:
            if r.status_code == 200:
                assert "error" in parse_stream(r.text)[-1]
            else:
                assert r.status_code == 500 and r.json()["error"]["code"] == "request_failed", r.text
            assert "injected plugin" not in r.text and "Traceback" not in r.text
        wait_kv_free(engine)
        assert httpx.get(srv.url + "/health").status_code == 200
        cls.forward = real_forward
        ok = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": long_prompt, "max_tokens": 4},
                        timeout=60)
        assert ok.status_code == 200
        record("plugin_fault", failing_requests=4, healthy_neighbours=6)
    finally:
        cls.forward = real_forward
        srv.stop()
        engine.shutdown()
