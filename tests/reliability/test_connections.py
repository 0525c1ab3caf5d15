"""Connections and clients that misbehave, against a server process: silent and half-header connections are closed
(header-read timeout), one client's idle connections are capped, a stream whose client stopped reading is aborted
after --stream-write-timeout with its KV blocks freed, and clients that hang up early are counted as 499, not 5xx.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from tests.reliability.conftest import metric_sum, record, spawn_server, stop_server, wait_idle_metrics

HEADER_TIMEOUT_S = 3.0
IDLE_CAP = 16
STALLED = 1
PROMPTS = 4


@pytest.fixture(scope="module")
def guarded(tiny_llama_dir, tmp_path_factory):
    """One server process for the cases below: short header and write timeouts, a small idle cap, and the stall
    file seam (absent: full speed)."""
    tmp = tmp_path_factory.mktemp("guarded")
    stall = tmp / "stall"
    srv = spawn_server(tiny_llama_dir, tmp, "--header-read-timeout", str(HEADER_TIMEOUT_S),
                       "--max-idle-connections-per-client", str(IDLE_CAP), "--stream-write-timeout", "1",
                       "--stall-file", str(stall))
    yield srv, stall
    stop_server(srv)


def _closed_within(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the server closed ``sock`` (EOF or reset), or None if it stayed open for ``limit``."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return time.monotonic() - t0
    except ConnectionResetError:
        return time.monotonic() - t0
    except TimeoutError:
        return None


def test_header_timeout_and_idle_cap(guarded):
    srv, _ = guarded
    host, port = srv.url.removeprefix("http://").split(":")
    silent = socket.create_connection((host, int(port)))
    partial = socket.create_connection((host, int(port)))
    partial.sendall(b"GET /heal")
    # generous: the point is that they are closed at all (they stayed open for minutes before)
    t_silent = _closed_within(silent, HEADER_TIMEOUT_S + 30)
    t_partial = _closed_within(partial, HEADER_TIMEOUT_S + 30)
    assert t_silent is not None and t_partial is not None, (t_silent, t_partial)
    # a slow but complete request on a fresh connection is still served
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
    # idle cap: of 2 x IDLE_CAP silent connections from one address at most IDLE_CAP stay open
    socks = [socket.create_connection((host, int(port))) for _ in range(2 * IDLE_CAP)]
    closed: set[int] = set()
    deadline = time.monotonic() + 20  # until the server has accepted them all and evicted the excess
    while time.monotonic() < deadline and len(socks) - len(closed) > IDLE_CAP:
        for i, sk in enumerate(socks):
            if i not in closed and _closed_within(sk, 0.01) is not None:
                closed.add(i)
        time.sleep(0.1)
    open_now = len(socks) - len(closed)
    for s in socks + [silent, partial]:
        s.close()
    record("connection_limits", header_timeout_s=HEADER_TIMEOUT_S, silent_closed_after_s=round(t_silent, 2),
           partial_header_closed_after_s=round(t_partial, 2), idle_cap=IDLE_CAP, idle_open_of_twice_the_cap=open_now)
    assert open_now <= IDLE_CAP, open_now
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "still fine", "max_tokens": 4})
        assert r.status_code == 200, r.text


def _stalled_stream(host: str, port: int, body: dict) -> socket.socket:
    """A client that sends a streaming request and then never reads (tiny receive buffer)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, port))
    payload = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    return s


def test_stalled_readers_are_aborted_and_freed(guarded):
    srv, stall = guarded
    m0 = wait_idle_metrics(srv)
    stall.touch()  # steps sleep: the streams cannot finish before their clients' buffers fill, on any machine
    host, port = srv.url.removeprefix("http://").split(":")
    # 4 prompts x n=16 with the top 20 logprobs per token: ~40 KB per step, so the server soon has more to write
    # than loopback's socket buffers hold (~3 MB) and its writes block on the client that does not read.
    body = {"model": "tiny", "prompt": [f"fill the pipe {i}" for i in range(PROMPTS)], "max_tokens": 400,
            "ignore_eos": True, "stream": True, "n": 16, "logprobs": 20}
    socks = [_stalled_stream(host, int(port), body) for _ in range(STALLED)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if metric_sum(srv.metrics(), "llmctl_num_requests_running") >= STALLED * PROMPTS * 16:
            break
        time.sleep(0.1)
    stall.unlink()  # now full speed: the streams outrun their non-reading clients and block on the socket
    t0 = time.monotonic()
    # aborted: nothing running, every KV block free, while the clients still hold their sockets open
    m = wait_idle_metrics(srv, timeout=120)
    freed_after = time.monotonic() - t0
    aborted = metric_sum(m, "llmctl_requests_finished_total", reason="abort") - \
        metric_sum(m0, "llmctl_requests_finished_total", reason="abort")
    length = metric_sum(m, "llmctl_requests_finished_total", reason="length") - \
        metric_sum(m0, "llmctl_requests_finished_total", reason="length")
    dropped = sum(_closed_within(s, 10) is not None for s in socks)
    for s in socks:
        s.close()
    record("stalled_readers", streams=STALLED, prompts=PROMPTS, n=16, logprobs=20, write_timeout_s=1,
           freed_after_s=round(freed_after, 1), aborted=aborted, finished_length=length, connections_dropped=dropped)
    assert aborted >= STALLED, (aborted, length)  # each HTTP request's 16 sequences are one abort per engine request
    assert dropped == STALLED
    assert "aborting it" in srv.output()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "after", "max_tokens": 4})
        assert r.status_code == 200


def test_early_hangups_are_client_aborts_not_5xx(guarded):
    srv, stall = guarded
    m0 = wait_idle_metrics(srv)
    stall.touch()
    n = 12

    async def scenario():
        async def client(i: int, stream: bool):
            body = {"model": "tiny", "prompt": f"leave {i}", "max_tokens": 400, "ignore_eos": True, "stream": stream}
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                await c.post("/v1/completions", json=body)

        tasks = [asyncio.create_task(client(i, i % 2 == 0)) for i in range(n)]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # every request is running (the stall keeps it from finishing)
            m = await asyncio.to_thread(srv.metrics)
            if metric_sum(m, "llmctl_num_requests_running") >= n:
                break
            await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()  # the clients give up and close their connections
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
    # While the steps are slowed nothing can finish: wait until the server has noticed every hang-up (aborted)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if metric_sum(srv.metrics(), "llmctl_requests_finished_total", reason="abort") - \
                metric_sum(m0, "llmctl_requests_finished_total", reason="abort") >= n:
            break
        time.sleep(0.1)
    stall.unlink()
    m = wait_idle_metrics(srv, timeout=60)
    text = srv.output()
    by_status = {k: v - m0.get(k, 0) for k, v in m.items()
                 if k.startswith("llmctl_http_requests_total") and "completions" in k}
    server_errors = sum(v for k, v in by_status.items() if 'status="5' in k)
    finished = {k: v - m0.get(k, 0) for k, v in m.items() if k.startswith("llmctl_requests_finished_total")}
    record("early_hangups", requests=n, by_status=by_status, finished=finished)
    assert server_errors == 0, by_status
    assert sum(v for k, v in by_status.items() if 'status="499"' in k) >= n // 2, by_status  # the non-streamed ones
    assert "Traceback" not in text and "ClientGone" not in text, text[-2000:]
    assert metric_sum(m, "llmctl_requests_finished_total", reason="abort") - \
        metric_sum(m0, "llmctl_requests_finished_total", reason="abort") == n
