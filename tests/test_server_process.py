"""The server as a process: `llmctl serve` under SIGTERM, the docs' curl examples, and exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from llmctl import AsyncLLM, EngineArgs
from llmctl_server import ServerSettings
from llmctl_server.launcher import EXIT_ENGINE_DEAD, run_server

from tests.test_server_support import free_port, parse_stream

ROOT = Path(__file__).resolve().parents[1]
LLMCTL = str(Path(sys.executable).parent / "llmctl")


def _wait_health(url: str, proc: subprocess.Popen, timeout: float = 120, log: Path | None = None) -> None:
    """``log``: where the server's output goes (a file: a pipe nobody reads can fill and block the server)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text()[-4000:] if log is not None else (proc.stderr.read() if proc.stderr else "")
            raise AssertionError(f"server exited early: {text}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become healthy")


@pytest.fixture()
def served(tiny_llama_dir, tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([LLMCTL, "serve", str(tiny_llama_dir), "--port", str(port), "--kv-cache-memory",
                                 "32MiB", "--served-model-name", "tiny", "--shutdown-timeout", "30",
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_health(url, proc, log=log)
        yield url, port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def test_docs_curl_examples_run(served):
    url, port, _ = served
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    text = (ROOT / "docs" / "serving.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    readme_curls = [b for b in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
                    if b.lstrip().startswith("curl")]
    assert readme_curls, "the README's curl example is missing"
    blocks += readme_curls
    for block in blocks:
        script = block.replace("localhost:8000", f"localhost:{port}")
        r = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (block, r.stderr)
        out = r.stdout.strip()
        if '"stream": true' in block:
            events = parse_stream(out + "\n\n")
            assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        else:
            decoder, pos, docs = json.JSONDecoder(), 0, 0
            while pos < len(out):  # curl prints bodies back to back, without newlines
                obj, end = decoder.raw_decode(out, pos)
                assert "error" not in obj, obj
                pos, docs = end + (len(out[end:]) - len(out[end:].lstrip())), docs + 1
            assert docs >= 1


def test_sigterm_drains_running_requests_and_exits_zero(served):
    """Whatever the machine's speed, the running stream ends well-formed: finished (``length``), or, if it could not
    finish within --shutdown-timeout, told ``server shutting down`` no earlier than that timeout; then exit 0.
    (Under heavy load the 30 s drain used to expire and uvicorn cut the stream mid-body.)"""
    url, _, proc = served
    shutdown_timeout = 30.0  # the fixture's --shutdown-timeout
    body = {"model": "tiny", "prompt": "count", "max_tokens": 150, "ignore_eos": True, "temperature": 0,
            "stream": True}
    result: dict = {}

    def consume():
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=shutdown_timeout + 60) as r:
                result["status"] = r.status_code
                result["raw"] = r.read().decode()
        except httpx.HTTPError as exc:
            result["error"] = repr(exc)
        result["end"] = time.monotonic()

    t = threading.Thread(target=consume)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "status" not in result:  # wait until the request is really running
        m = httpx.get(url + "/metrics", timeout=5).text
        if re.search(r"^llmctl_num_requests_running(\{[^}]*\})? 1\.0", m, flags=re.M):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    t_term = time.monotonic()
    time.sleep(0.3)
    try:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=5)
        assert r.status_code == 503  # the listener stays open while draining, and refuses
    except httpx.ConnectError:
        pass  # the stream already finished and the server has stopped
    t.join()
    assert "error" not in result, result.get("error")
    assert result["status"] == 200
    events = parse_stream(result["raw"])
    last = events[-1]
    if "error" in last:
        assert last["error"]["message"] == "server shutting down"
        assert result["end"] - t_term >= shutdown_timeout - 0.1
    else:
        assert last["choices"][0]["finish_reason"] == "length"
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events) > 1
    assert proc.wait(60) == 0


def test_engine_death_exits_nonzero(tiny_llama_dir):
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(tiny_llama_dir), kv_cache_memory=16 << 20))
    port = free_port()
    code: dict = {}
    t = threading.Thread(target=lambda: code.setdefault("rc", run_server(
        engine, ServerSettings(engine_poll_interval=0.1), port=port, log_level="warning")))
    t.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)

        def crash():
            raise SystemError("simulated engine crash")

        engine.engine.step = crash
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=10)
        assert r.status_code == 503
        t.join(20)
        assert not t.is_alive()
        assert code["rc"] == EXIT_ENGINE_DEAD
    finally:
        engine.shutdown()


def test_serve_user_errors_are_one_line(tmp_path):
    env = dict(os.environ)
    r = subprocess.run([LLMCTL, "serve", str(tmp_path / "no-such-model"), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "error:" in r.stderr
