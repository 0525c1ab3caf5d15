"""Load: a streaming storm with random disconnects (subprocess server: RSS, KV blocks, metrics) and overload."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import httpx

from tests.reliability.conftest import (
    SOAK,
    SOAK_SECONDS,
    metric_sum,
    record,
    rss_anon_kib,
    scaled,
    wait_idle_metrics,
)

CLIENTS = 256
DISCONNECT_FRACTION = 0.2
# Tiny Llama: 8 KiB per KV block (2 layers x K,V x 16 slots x 2 heads x 16 x fp32), so 5 MiB = 640 blocks. A round
# needs <= 512 at once (256 streams x <= 21 tokens = 2 blocks) and hands out ~345, and free blocks are handed out in
# LRU order, so the 3 warm-up rounds (~1000 allocations) write every block once. With the old 12 MiB (1536 blocks)
# the warm-up wrote only 62% of them (961 of 1537 pages per layer, read from /proc/PID/pagemap) and the measured
# rounds committed the rest: +4.5 MiB of the +5-8 MiB "growth" in docs/reliability.md.
KV_BYTES = 5 << 20
SOAK_KV_BYTES = 12 << 20  # LLMCTL_SOAK_MODEL (SmolLM2: ~0.7 MiB per block): 16 blocks, all written by the warm-up
# The engine trims malloc once it has been idle for 0.5 s (core/llmctl/engine/async_llm.py); RssAnon is read after it
SETTLE_S = 1.5
# Bounded run (768 requests): the measured rounds' RssAnon usually stays within 0.7 MiB of the post-warm-up value
# with the trim (+83 MiB swings without it), but 2 of ~12 runs grew 2.1 and 2.7 MiB, in steps of ~1-1.5 MiB in the
# last rounds, the size of Python's object arenas (1 MiB): most likely arenas kept alive by fragmentation of the
# server's per-stream objects (not traced further), not a leak. 4 MiB still catches a leak of ~5 KiB per request.
CI_MAX_GROWTH_KIB = 4096
WARMUP_ROUNDS = 3
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "north", "quiet", "lamp", "orbit"]


async def _one(c: httpx.AsyncClient, rng: random.Random, max_tokens: int) -> dict:
    """One streaming client; 20% of them hang up after a random number of events."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": rng.choice([0.0, 0.8]), "ignore_eos": rng.random() < 0.5, "seed": rng.randint(0, 99)}
    leave_after = rng.randint(0, max_tokens) if rng.random() < DISCONNECT_FRACTION else None
    res = {"status": None, "aborted": False, "events": [], "done": False}
    async with c.stream("POST", "/v1/completions", json=body) as r:
        res["status"] = r.status_code
        if r.status_code != 200:
            await r.aread()
            res["body"] = r.text
            return res
        n = 0
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: "):]
            if payload == "[DONE]":
                res["done"] = True
                continue
            assert not res["done"], "event after [DONE]"
            res["events"].append(json.loads(payload))
            n += 1
            if leave_after is not None and n > leave_after:
                res["aborted"] = True
                break  # leaving the context manager closes the connection mid-stream
    return res


async def _round(url: str, rng: random.Random, max_tokens: int) -> list[dict]:
    limits = httpx.Limits(max_connections=CLIENTS + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120), limits=limits) as c:
        return await asyncio.wait_for(asyncio.gather(*[_one(c, rng, max_tokens) for _ in range(CLIENTS)]), 300)


def _check(results: list[dict]) -> tuple[int, int, int]:
    """Every non-aborted stream: 200, a finish reason on its last choice event, then [DONE]. Returns counts."""
    completed = aborted = rejected = 0
    for res in results:
        assert res["status"] is not None and res["status"] < 500, res
        if res["status"] == 503:
            rejected += 1
            continue
        assert res["status"] == 200, res
        if res["aborted"]:
            aborted += 1
            continue
        assert res["done"], res
        finals = [e for e in res["events"] if e.get("choices") and e["choices"][0].get("finish_reason")]
        assert len(finals) == 1 and finals[0] is res["events"][-1], res["events"][-3:]
        assert finals[0]["choices"][0]["finish_reason"] in ("stop", "length"), finals[0]
        completed += 1
    return completed, aborted, rejected


def test_streaming_storm(server_factory, tiny_llama_dir):
    model = os.environ.get("LLMCTL_SOAK_MODEL") or str(tiny_llama_dir)
    # KV cache small enough that the warm-up touches every block (it is allocated lazily: first use of a block
    # grows RSS once) and, on the tiny model, large enough for all 256 streams at once
    kv_bytes = SOAK_KV_BYTES if os.environ.get("LLMCTL_SOAK_MODEL") else KV_BYTES
    srv = server_factory(model, "--kv-cache-memory", str(kv_bytes))
    rng = random.Random(1234)
    max_tokens = 8
    # warm-up: allocator pools, tokenizer caches, torch kernels, the KV cache itself (allocated lazily)
    for _ in range(WARMUP_ROUNDS):
        _check(asyncio.run(_round(srv.url, rng, max_tokens)))
        wait_idle_metrics(srv)
    time.sleep(SETTLE_S)
    base_m = srv.metrics()
    rss0 = rss_anon_kib(srv.pid)
    rss_trace = [rss0]
    rounds = 0
    totals = [0, 0, 0]
    t0 = time.monotonic()
    min_rounds = scaled(3, 3)
    while rounds < min_rounds or (SOAK and time.monotonic() - t0 < SOAK_SECONDS):
        results = asyncio.run(_round(srv.url, rng, max_tokens))
        for i, v in enumerate(_check(results)):
            totals[i] += v
        rounds += 1
        m = wait_idle_metrics(srv)  # free KV blocks return to the total after every round
        time.sleep(SETTLE_S)
        rss_trace.append(rss_anon_kib(srv.pid))
        assert srv.proc.poll() is None
    rss1 = rss_anon_kib(srv.pid)
    elapsed = time.monotonic() - t0
    n = rounds * CLIENTS
    completed, aborted, rejected = totals
    assert completed + aborted + rejected == n

    # /metrics: every generation request is counted once by status, and once by finish reason (client aborts
    # included, as reason="abort"), so requests in = finished + aborted + rejected holds exactly.
    def delta(name: str, **labels: str) -> float:
        return metric_sum(m, name, **labels) - metric_sum(base_m, name, **labels)

    http_in = delta("llmctl_http_requests_total", route="/v1/completions")
    http_503 = delta("llmctl_http_requests_total", route="/v1/completions", status="503")
    http_5xx = sum(delta("llmctl_http_requests_total", route="/v1/completions", status=str(s))
                   for s in (500, 502, 504))
    finished = delta("llmctl_requests_finished_total")
    abort_counter = delta("llmctl_requests_finished_total", reason="abort")
    assert http_in == n, (http_in, n)
    assert http_5xx == 0 and http_503 == rejected
    unaccounted = http_in - finished - http_503
    assert unaccounted == 0, (http_in, finished, http_503, aborted)
    # a client that disconnects after its last token was generated finished in the server, not aborted
    assert abort_counter <= aborted, (abort_counter, aborted)
    growth_kib = rss1 - rss0
    per_1000 = growth_kib / 1024 / (n / 1000)
    record("streaming_storm", model=os.path.basename(model), rounds=rounds, requests=n, clients=CLIENTS,
           completed=completed, disconnects=aborted, rejected=rejected, server_aborts_uncounted=int(unaccounted),
           abort_counter=abort_counter, kv_blocks_leaked=0, rss_anon_start_kib=rss0, rss_anon_end_kib=rss1,
           rss_growth_mib_per_1000=round(per_1000, 3), rss_trace_kib=rss_trace, seconds=round(elapsed, 1))
    # 1 MiB per 1000 requests is 0.77 MiB over the bounded run's 768 requests, about the allocator's own noise after
    # the trim, so the bounded run asserts CI_MAX_GROWTH_KIB and soak runs (>= 5000 requests) the rate
    if not SOAK:
        assert growth_kib < CI_MAX_GROWTH_KIB, f"server RssAnon grew {growth_kib} KiB over {n} requests: {rss_trace}"
    if n >= 5000:
        assert per_1000 < 1.0, f"server RssAnon grew {growth_kib} KiB over {n} requests: {rss_trace}"


async def _overload(url: str, total: int) -> tuple[list, list[tuple[int, float]], list[float]]:
    limits = httpx.Limits(max_connections=total + 4, max_keepalive_connections=total + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120), limits=limits) as c:
        # open every connection first so that the timings below are the server's answer, not TCP set-up
        await asyncio.gather(*[c.get("/health") for _ in range(total)])

        async def one(i: int) -> tuple[int, float, str | None, dict | None]:
            # long enough that the admitted requests still fill the queue while the probes below run
            body = {"model": "tiny", "prompt": f"request {i}", "max_tokens": 480, "ignore_eos": True,
                    "temperature": 0}
            t = time.monotonic()
            r = await c.post("/v1/completions", json=body)
            dt = time.monotonic() - t
            return r.status_code, dt, r.headers.get("retry-after"), r.json()

        burst = asyncio.gather(*[one(i) for i in range(total)])
        await asyncio.sleep(0.3)
        # While the burst still fills the queue: one request at a time, so the time is the server's answer alone
        # (the burst's own timings include this client serialising 24 requests on one event loop)
        probes, health = [], []
        for _ in range(5):
            t = time.monotonic()
            r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "probe", "max_tokens": 2})
            probes.append((r.status_code, time.monotonic() - t))
            t = time.monotonic()
            await c.get("/health")  # the same box's answer time for a route that does nothing
            health.append(time.monotonic() - t)
        return await asyncio.wait_for(burst, 120), probes, health


def test_overload_rejects_fast_and_completes_the_rest(server_factory, tiny_llama_dir):
    max_num_seqs, max_queued = 4, 8
    srv = server_factory(tiny_llama_dir, "--max-num-seqs", str(max_num_seqs), "--max-queued-requests",
                         str(max_queued))
    total = 3 * max_queued
    results, probes, health = asyncio.run(_overload(srv.url, total))
    accepted = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 503]
    assert len(accepted) + len(rejected) == total, [r[0] for r in results]
    assert rejected, "nothing was rejected"
    for _status, _dt, retry_after, body in rejected:
        assert retry_after is not None and int(retry_after) >= 1
        assert body["error"]["type"] == "service_unavailable"
    reject_ms = sorted(r[1] * 1000 for r in rejected)
    slowest_reject_ms, median_reject_ms = reject_ms[-1], reject_ms[len(reject_ms) // 2]
    for _, _, _, body in accepted:
        assert body["choices"][0]["finish_reason"] == "length"
    wait_idle_metrics(srv)
    record("overload", sent=total, max_num_seqs=max_num_seqs, max_queued_requests=max_queued,
           accepted=len(accepted), rejected=len(rejected), median_503_ms=round(median_reject_ms, 1),
           slowest_503_ms=round(slowest_reject_ms, 1), probe_503_ms=[round(dt * 1000, 1) for _, dt in probes])
    assert all(st == 503 for st, _ in probes), probes
    # The rejection answers before any engine work; the median keeps one scheduler hiccup of a shared 2-core
    # box from failing the run, while a slow rejection path still does (see docs/reliability.md). Bounded by
    # 50 ms or, on a box so loaded that /health itself is slow, 3x /health's median in the same window.
    probe_ms = sorted(dt * 1000 for _, dt in probes)
    health_ms = sorted(dt * 1000 for dt in health)
    assert probe_ms[len(probe_ms) // 2] < max(50.0, 3 * health_ms[len(health_ms) // 2]), (probes, health)
    # Everything the engine could run or queue should have been admitted
    assert len(accepted) >= max_num_seqs + max_queued, (len(accepted), max_num_seqs + max_queued)


def test_default_queue_bound_from_max_num_seqs(server_factory, tiny_llama_dir, tmp_path):
    """No --max-queued-requests: the queue holds max_num_seqs requests, so exactly running + queued are admitted
    (steps are held by the stall file, so none finishes during the burst on any machine); the rest 503 quickly."""
    stall = tmp_path / "stall"
    stall.touch()
    max_num_seqs = 3
    srv = server_factory(tiny_llama_dir, "--max-num-seqs", str(max_num_seqs), "--stall-file", str(stall))
    total = 4 * max_num_seqs

    async def burst():
        limits = httpx.Limits(max_connections=total + 2)
        async with httpx.AsyncClient(base_url=srv.url, timeout=httpx.Timeout(120), limits=limits) as c:
            body = {"model": "tiny", "prompt": "queued", "max_tokens": 40, "ignore_eos": True}
            tasks = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(total)]
            rejected = []
            while len(rejected) < total - 2 * max_num_seqs:
                done = [t for t in tasks if t.done()]
                rejected = [t.result() for t in done if t.result().status_code == 503]
                await asyncio.sleep(0.05)
            stall.unlink()
            return [await t for t in tasks]

    results = asyncio.run(asyncio.wait_for(burst(), 180))
    accepted = [r for r in results if r.status_code == 200]
    rejected = [r for r in results if r.status_code == 503]
    record("default_queue_bound", max_num_seqs=max_num_seqs, sent=total, accepted=len(accepted),
           rejected=len(rejected))
    assert len(accepted) == 2 * max_num_seqs, [r.status_code for r in results]
    assert len(rejected) == total - 2 * max_num_seqs
    for r in rejected:
        assert int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["error"]["message"]
    wait_idle_metrics(srv)
