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

from tests.reliability.conftest import build_engine, children_of, record, scaled
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


def test_sigterm_under_load(server_factory, tiny_llama_dir):
    srv = server_factory(tiny_llama_dir, "--shutdown-timeout", "30")
    n = scaled(16, 64)

    async def scenario():
        async def one(i):
            body = {"model": "tiny", "prompt": f"drain me {i}", "max_tokens": 120, "ignore_eos": True,
                    "stream": True, "temperature": 0}
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                r = await c.post("/v1/completions", json=body)
                return r.status_code, r.text

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = httpx.get(srv.url + "/metrics", timeout=5).text
            if re.search(rf"^llmctl_num_requests_running(\{{[^}}]*\}})? {float(n)}$", m, flags=re.M):
                break
            await asyncio.sleep(0.05)
        kids = children_of(srv.pid)
        srv.proc.send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        await asyncio.sleep(0.2)
        late = []
        for _ in range(3):
            try:
                async with httpx.AsyncClient(base_url=srv.url, timeout=5) as c:
                    late.append((await c.post("/v1/completions", json={"model": "tiny", "prompt": "x"})).status_code)
            except httpx.HTTPError:
                late.append("refused")
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return t_term, kids, late, results

    t_term, kids, late, results = asyncio.run(scenario())
    for status, text in results:
        assert status == 200
        events = parse_stream(text)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(x in (503, "refused") for x in late), late
    rc = srv.proc.wait(35)
    exit_s = time.monotonic() - t_term
    alive = [k for k in kids if _alive(k)]
    record("sigterm_under_load", in_flight=n, late_requests=late, exit_code=rc, exit_seconds=round(exit_s, 1),
           children_before=len(kids), orphans=len(alive))
    assert rc == 0
    assert not alive, alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except OSError:
        return False
