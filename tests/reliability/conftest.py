"""Shared pieces of the reliability suite (docs/reliability.md).

Bounded by default (CI); ``LLMCTL_SOAK_SECONDS=N`` (set by ``benchmarks/soak/run.py``) turns the storm into an
N-second soak and scales the other loops. ``LLMCTL_SOAK_MODEL`` overrides the storm's model (the soak script passes
the SmolLM2 GGUF). ``LLMCTL_RELIABILITY_REPORT=path.json`` collects each case's figures into one JSON file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from llmctl import AsyncLLM, EngineArgs

from tests.test_server_support import free_port

ROOT = Path(__file__).resolve().parents[2]
SOAK_SECONDS = float(os.environ.get("LLMCTL_SOAK_SECONDS", "0") or 0)
SOAK = SOAK_SECONDS > 0
_FIGURES: dict[str, dict[str, Any]] = {}


def scaled(ci: int, soak: int) -> int:
    """A count: ``ci`` in the bounded run, ``soak`` in a soak run."""
    return soak if SOAK else ci


def record(case: str, **figures: Any) -> None:
    """Keep a case's figures for docs/reliability.md (written at session end when LLMCTL_RELIABILITY_REPORT is set)."""
    _FIGURES.setdefault(case, {}).update(figures)
    print(f"[reliability] {case}: {json.dumps(figures, default=str)}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("LLMCTL_RELIABILITY_REPORT")
    if path and _FIGURES:
        old: dict[str, Any] = {}
        if Path(path).exists():
            try:
                old = json.loads(Path(path).read_text())
            except ValueError:
                old = {}
        old.update(_FIGURES)
        Path(path).write_text(json.dumps(old, indent=2, default=str) + "\n")


def build_engine(model: str | Path, fault_injection: bool = False, **kw: Any) -> AsyncLLM:
    kw.setdefault("kv_cache_memory", 32 << 20)
    kw.setdefault("seed", 0)
    kw.setdefault("num_threads", 1)
    old = os.environ.get("LLMCTL_ENABLE_FAULT_INJECTION")
    if fault_injection:
        os.environ["LLMCTL_ENABLE_FAULT_INJECTION"] = "1"
    try:
        return AsyncLLM.from_engine_args(EngineArgs.from_kwargs(str(model), **kw))
    finally:
        if fault_injection:
            if old is None:
                os.environ.pop("LLMCTL_ENABLE_FAULT_INJECTION", None)
            else:
                os.environ["LLMCTL_ENABLE_FAULT_INJECTION"] = old


# -- the server as a process ---------------------------------------------------------------------------------------
@dataclass
class ServerProc:
    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)


def spawn_server(model: str | Path, tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                 module: str = "tests.reliability._serve", timeout: float = 120) -> ServerProc:
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", module, str(model), "--port", str(port), *args],
                                stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=str(ROOT))
    srv = ServerProc(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early ({proc.returncode}): {srv.output()}")
        try:
            if httpx.get(srv.url + "/health", timeout=1).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(srv)
            raise AssertionError(f"server did not become healthy: {srv.output()}")
        time.sleep(0.2)


def stop_server(srv: ServerProc) -> None:
    """Only ever signals the process this suite started."""
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(30)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait(10)


@pytest.fixture()
def server_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[ServerProc] = []

    def make(model: str | Path, *args: str, **kw: Any) -> ServerProc:
        srv = spawn_server(model, tmp_path, *args, **kw)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        stop_server(srv)


# -- /proc and /metrics ----------------------------------------------------------------------------------------------
def rss_anon_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon line")


def children_of(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc/*/stat)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        parent[int(d.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample of a Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line.strip())
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def wait_idle_metrics(srv: ServerProc, timeout: float = 20.0) -> dict[str, float]:
    """Until the engine has nothing running or waiting and every KV block is free (usage ratio 0)."""
    deadline = time.monotonic() + timeout
    m: dict[str, float] = {}
    while time.monotonic() < deadline:
        m = srv.metrics()
        busy = [metric_sum(m, name) for name in ("llmctl_num_requests_running", "llmctl_num_requests_waiting",
                                                 "llmctl_kv_cache_usage_ratio")]
        if m and busy == [0, 0, 0]:
            return m
        time.sleep(0.1)
    raise AssertionError(f"engine not idle / KV blocks not all free: "
                         f"{ {k: v for k, v in m.items() if 'kv' in k or 'num_requests' in k} }")
