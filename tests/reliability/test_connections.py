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

from tests.reliability.conftest import metric_sum, record, wait_idle_metrics

HEADER_TIMEOUT_S = 1.0
STALLED = 2


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


def test_header_timeout_and_idle_cap(server_factory, tiny_llama_dir):
    srv = server_factory(tiny_llama_dir, "--header-read-timeout", str(HEADER_TIMEOUT_S),
                         "--max-idle-connections-per-client", "4")
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
    # idle cap: of 10 silent connections from one address at most 4 stay open
    socks = [socket.create_connection((host, int(port))) for _ in range(10)]
    time.sleep(0.3)
    open_now = sum(_closed_within(s, 0.2) is None for s in socks)
    for s in socks + [silent, partial]:
        s.close()
    record("connection_limits", header_timeout_s=HEADER_TIMEOUT_S, silent_closed_after_s=round(t_silent, 2),
           partial_header_closed_after_s=round(t_partial, 2), idle_cap=4, idle_open_of_10=open_now)
    assert open_now <= 4, open_now
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


def test_stalled_readers_are_aborted_and_freed(server_factory, tiny_llama_dir, tmp_path):
    stall = tmp_path / "stall"
    stall.touch()  # steps sleep: the streams cannot finish before their clients' buffers fill, on any machine
    srv = server_factory(tiny_llama_dir, "--stream-write-timeout", "1", "--stall-file", str(stall))
    host, port = srv.url.removeprefix("http://").split(":")
    body = {"model": "tiny", "prompt": "fill the pipe", "max_tokens": 480, "ignore_eos": True, "stream": True,
            "n": 16, "logprobs": 20}
    socks = [_stalled_stream(host, int(port), body) for _ in range(STALLED)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if metric_sum(srv.metrics(), "llmctl_num_requests_running") >= STALLED * 16:
            break
        time.sleep(0.1)
    stall.unlink()  # now full speed: the streams outrun their non-reading clients and block on the socket
    t0 = time.monotonic()
    # aborted: nothing running, every KV block free, while the clients still hold their sockets open
    m = wait_idle_metrics(srv, timeout=120)
    freed_after = time.monotonic() - t0
    aborted = metric_sum(m, "llmctl_requests_finished_total", reason="abort")
    length = metric_sum(m, "llmctl_requests_finished_total", reason="length")
    dropped = sum(_closed_within(s, 10) is not None for s in socks)
    for s in socks:
        s.close()
    record("stalled_readers", streams=STALLED, n=16, logprobs=20, write_timeout_s=1,
           freed_after_s=round(freed_after, 1), aborted=aborted, finished_length=length, connections_dropped=dropped)
    assert aborted >= STALLED, (aborted, length)  # each HTTP request's 16 sequences are one abort per engine request
    assert dropped == STALLED
    assert "aborting it" in srv.output()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "after", "max_tokens": 4})
        assert r.status_code == 200


def test_early_hangups_are_client_aborts_not_5xx(server_factory, tiny_llama_dir, tmp_path):
    stall = tmp_path / "stall"
    stall.touch()
    srv = server_factory(tiny_llama_dir, "--stall-file", str(stall))
    n = 12

    async def scenario():
        async def hang_up(i: int, stream: bool):
            body = {"model": "tiny", "prompt": f"leave {i}", "max_tokens": 400, "ignore_eos": True, "stream": stream}
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                try:
                    await asyncio.wait_for(c.post("/v1/completions", json=body), 0.5)
                except TimeoutError:
                    pass  # the client gives up before the first token and closes the connection

        await asyncio.gather(*[hang_up(i, i % 2 == 0) for i in range(n)])

    asyncio.run(scenario())
    # While the steps are slowed nothing can finish: wait until the server has noticed every hang-up (aborted)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if metric_sum(srv.metrics(), "llmctl_requests_finished_total", reason="abort") >= n:
            break
        time.sleep(0.1)
    stall.unlink()
    m = wait_idle_metrics(srv, timeout=60)
    text = srv.output()
    by_status = {k: v for k, v in m.items() if k.startswith("llmctl_http_requests_total") and "completions" in k}
    server_errors = sum(v for k, v in by_status.items() if 'status="5' in k)
    finished = {k: v for k, v in m.items() if k.startswith("llmctl_requests_finished_total")}
    record("early_hangups", requests=n, by_status=by_status, finished=finished)
    assert server_errors == 0, by_status
    assert sum(v for k, v in by_status.items() if 'status="499"' in k) >= n // 2, by_status  # the non-streamed ones
    assert "Traceback" not in text and "ClientGone" not in text, text[-2000:]
    assert metric_sum(m, "llmctl_requests_finished_total", reason="abort") == n
