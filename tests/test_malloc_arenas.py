"""The server's threads share glibc's main malloc arena, the only one whose free top ``malloc_trim`` returns."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc arenas are Linux-only")

# Threads that each allocate and free blocks big enough to need malloc (and below the mmap threshold), then
# glibc's per-arena statistics on stderr: one "Arena N:" line per arena in use.
_SCRIPT = textwrap.dedent("""
    import ctypes, sys, threading
    if sys.argv[1] == "limit":
        from llmctl.engine.async_llm import limit_malloc_arenas
        limit_malloc_arenas()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def work():
        blocks = [libc.malloc(64 << 10) for _ in range(16)]
        for b in blocks:
            libc.free(b)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    libc.malloc_stats()
""")


def _arenas(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["LLMCTL_MALLOC_TRIM"] = "1"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    if "Arena 0:" not in proc.stderr:
        pytest.skip("this C library has no glibc malloc_stats")
    return sum(1 for line in proc.stderr.splitlines() if line.startswith("Arena "))


def test_threads_share_the_main_arena_after_the_limit() -> None:
    assert _arenas("limit") == 1


def test_without_the_limit_threads_get_arenas_of_their_own() -> None:
    """The control: the script's threads do spread over arenas, so the test above can fail."""
    assert _arenas("none") > 1
