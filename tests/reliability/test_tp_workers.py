"""Tensor-parallel worker processes under hostile conditions: the driver killed outright (no clean-up code runs),
a rank that fails while starting, and a start-up past its deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.model_factory import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]

_DRIVER = """
import sys, time
from llmctl import LLM
llm = LLM(sys.argv[1], dtype="float32", tensor_parallel_size=2, num_threads=1)
print(" ".join(str(p) for p in llm.llm_engine.core.worker_pids), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def model(tmp_path_factory, test_tokenizer):
    return make_tiny_model("llama", tmp_path_factory.mktemp("tp-rel") / "llama", test_tokenizer)


def test_workers_exit_when_the_driver_is_killed(model):
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(model)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline()
        assert line.strip(), driver.stderr.read()[-3000:]
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "a worker outlived its killed driver"
        # the ring the driver never got to unlink: its resource tracker does, once the ranks have gone
        prefix = f"llmctl_ring_{driver.pid}_"
        while _rings(prefix) and time.monotonic() < deadline + 10:
            time.sleep(0.1)
        assert not _rings(prefix), "the killed driver's step ring was left in /dev/shm"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)


def test_rank_failing_at_start_is_reported_and_nothing_is_left(model):
    """A rank whose engine cannot start (here: a platform option the CPU refuses) fails the LLM with that
    rank's message instead of leaving the others waiting for it."""
    from llmctl import LLM

    before = set(_children())
    with pytest.raises(ValueError, match="num_threads"):
        LLM(str(model), dtype="float32", tensor_parallel_size=2, num_threads=-3)
    time.sleep(0.5)
    assert not _leftover_workers(before)
    assert not _rings(f"llmctl_ring_{os.getpid()}_"), "a failed start left its step ring in /dev/shm"


def test_start_past_its_deadline_times_out(model, monkeypatch):
    """Ranks that have not finished starting by LLMCTL_WORKER_START_TIMEOUT_SECONDS (2 s here: less than a spawned
    worker needs to import torch) end start-up with an error naming the timeout, and are stopped."""
    from llmctl import LLM

    monkeypatch.setenv("LLMCTL_WORKER_START_TIMEOUT_SECONDS", "2")
    before = set(_children())
    with pytest.raises(TimeoutError, match="no answer from the tensor-parallel ranks within 2 s"):
        LLM(str(model), dtype="float32", tensor_parallel_size=2, num_threads=1)
    time.sleep(0.5)
    assert not _leftover_workers(before)


def _rings(prefix: str) -> list[str]:
    shm = Path("/dev/shm")
    return [p.name for p in shm.iterdir() if p.name.startswith(prefix)] if shm.is_dir() else []


def _children() -> list[int]:
    kids: list[int] = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def _leftover_workers(before: set[int]) -> list[str]:
    """Children started since ``before`` that still run, except multiprocessing's resource tracker (one per
    process that ever spawned, by design; it exits with this process)."""
    return [cmd for p in set(_children()) - before if _alive(p) and "resource_tracker" not in (cmd := _cmd(p))]


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except FileNotFoundError:
        return str(pid)
