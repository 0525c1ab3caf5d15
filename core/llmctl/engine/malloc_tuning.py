"""glibc malloc settings for an engine process: few arenas, headroom at the heap top, trimming when idle.

A decode step allocates and frees the same large temporaries every step (logits are rows x vocab: 6 MiB at 64
rows of a 49k vocab in bf16). glibc hands the freed top of the heap back to the OS as soon as it passes the trim
threshold and the next step faults the same pages in again: ~200 page faults per 64-sequence decode step on
SmolLM2-135M, a few microseconds each on a VM. ``keep_heap_headroom`` keeps that much free memory at the top
instead; an idle server still returns it (``AsyncLLM`` calls ``malloc_trim(0)`` after each busy period).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8  # glibc mallopt parameters
HEAP_HEADROOM_BYTES = 64 << 20
MMAP_THRESHOLD_BYTES = 32 << 20


def _load_malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (not Linux/glibc, e.g. musl or macOS, or LLMCTL_MALLOC_TRIM=0)."""
    if os.environ.get("LLMCTL_MALLOC_TRIM", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


malloc_trim = _load_malloc_trim()  # AsyncLLM calls it once idle


def limit_malloc_arenas(n: int = 1) -> None:
    """Put every thread this process starts from now on in glibc's main malloc arena (unless MALLOC_ARENA_MAX is
    set, which glibc honours itself). A thread started before this call may already own a second arena that
    later threads then share, so a server calls it before it starts any thread (``AsyncLLM`` calls it again,
    harmlessly).

    Why one: ``malloc_trim`` returns the free top of the main arena to the OS but not the top of a per-thread
    arena, which glibc shrinks only when a free pushes it past the trim threshold, and that threshold rises with
    the largest temporary freed (up to 64 MiB). With the engine thread in its own arena, an idle server's RssAnon
    stayed up to ~45 MiB high after some bursts and not after others (the reliability storm's bounded run: swings
    of -40..+45 MiB between rounds; with one arena, within 0.6 MiB). Each extra arena also cost a ~20 MiB step
    early in a server's life. The threads that share the arena contend on its lock rarely: Python's small objects
    never reach malloc, and served throughput and one-stream TPOT were unchanged within the box's noise.
    """
    if malloc_trim is None or os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, n)
    except (OSError, AttributeError):
        pass


def keep_heap_headroom(nbytes: int = HEAP_HEADROOM_BYTES) -> None:
    """Keep ``nbytes`` of free memory at the top of each malloc heap when it grows or shrinks (glibc's
    ``M_TOP_PAD``), so a step's temporaries reuse pages the previous step freed instead of faulting in new ones:
    ~200-260 faults per 64-sequence decode step of SmolLM2-135M, none with this. No-op off glibc, with
    ``LLMCTL_MALLOC_TRIM=0``, or when ``MALLOC_TOP_PAD_`` is set (glibc honours that itself)."""
    if malloc_trim is None or os.environ.get("MALLOC_TOP_PAD_"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_TOP_PAD, int(nbytes))
        # Setting any of these turns glibc's sliding mmap threshold off, which would leave it at 128 KiB and mmap
        # (and fault in) every large temporary each step: pin it where it would have slid to (its 64-bit
        # maximum), and trim only past twice the headroom.
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * int(nbytes))
    except (OSError, AttributeError):
        pass
