"""KV cache pages faulted in ahead of the blocks the engine reaches, instead of a fixed share at start-up.

Why: a first touch of a fresh 4 KiB page is a page fault (several microseconds on a VM), and the steps that
write new KV blocks would pay it. Zeroing a fixed 1 GiB at start-up kept that out of the steps but made the
process hold 1 GiB whatever the workload used: a small workload's peak RSS was mostly untouched cache. Here a
small first slab is faulted in at start-up and the rest follows the pool's frontier (the block pool hands out
fresh ids in order, so the highest id handed out is how far the workload has reached), a slab ahead of it, on
a worker thread, so the memory held tracks what the workload uses plus one slab.

The worker uses ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14): the kernel maps and zeroes the pages without a
trap per page, and it is safe while kernels write the same pages (a page already present is left as it is).
Where the kernel lacks it, the start-up slab is zeroed instead and later blocks fault on first touch (zeroing
from a worker would race with the kernels' writes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import threading

import torch

logger = logging.getLogger("llmctl_cpu.kv_prefault")

MADV_POPULATE_WRITE = 23
_PAGE = 4096


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def block_byte_ranges(t: torch.Tensor, num_blocks: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """The address ranges holding blocks ``[lo, hi)`` of one layer's cache: one per K/V half in the CPU backend's
    ``[2, num_blocks, ...]`` layout, else the same share of the tensor's leading bytes."""
    if hi <= lo:
        return []
    esz = t.element_size()
    base = t.data_ptr()
    if t.dim() >= 2 and t.shape[1] == num_blocks and t.is_contiguous():
        per_block = t.stride(1) * esz
        return [(base + h * t.stride(0) * esz + lo * per_block, base + h * t.stride(0) * esz + hi * per_block)
                for h in range(t.shape[0])]
    nbytes = t.numel() * esz
    return [(base + nbytes * lo // num_blocks, base + nbytes * hi // num_blocks)]


def populate(ranges: list[tuple[int, int]]) -> bool:
    """Map and zero the pages of ``ranges`` (widened to whole pages) without writing them from user space.
    False when the kernel cannot (no ``MADV_POPULATE_WRITE``): nothing was done that matters, pages still
    fault in on first touch."""
    fn = _madvise()
    if fn is None:
        return False
    for start, end in ranges:
        a = start & ~(_PAGE - 1)
        if end > a and fn(a, end - a, MADV_POPULATE_WRITE) != 0:
            return False
    return True


def _zero(kv_caches: list[torch.Tensor], num_blocks: int, hi: int) -> None:
    with torch.no_grad():
        for t in kv_caches:
            if t.dim() >= 2 and t.shape[1] == num_blocks:
                t[:, :hi].zero_()
            else:
                flat = t.view(-1)
                flat[: flat.numel() * hi // num_blocks].zero_()


class KVPrefaulter:
    """Keeps the faulted-in part of one KV cache up to ``ahead_blocks`` ahead of the highest block reached.

    The engine calls it with the number of blocks the pool has reached whenever that grows; a call that finds
    at least half of ``ahead_blocks`` still faulted in ahead returns at once, else the part up to
    ``reached + ahead_blocks`` goes to one worker thread, so calls that need work are rare (one per half slab
    of new blocks) and the memory held stays within one slab of what the workload reached."""

    def __init__(self, kv_caches: list[torch.Tensor], num_blocks: int, initial_blocks: int, ahead_blocks: int,
                 background: bool = True) -> None:
        self.kv_caches = kv_caches
        self.num_blocks = num_blocks
        self.ahead_blocks = max(1, ahead_blocks)
        self.background = background
        self.requested = 0  # blocks [0, requested) are faulted in or being faulted in
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._pending: tuple[int, int] | None = None
        initial = min(num_blocks, max(0, initial_blocks))
        if initial and not self._populate(0, initial):
            _zero(kv_caches, num_blocks, initial)  # at start-up no kernel writes yet, so zeroing is safe
            self.background = False  # and nothing else can be done safely later
            self.ahead_blocks = num_blocks
        self.requested = initial
        self.supported = self.background

    def _populate(self, lo: int, hi: int) -> bool:
        return populate([r for t in self.kv_caches for r in block_byte_ranges(t, self.num_blocks, lo, hi)])

    def __call__(self, reached: int) -> None:
        if self.requested - reached >= (self.ahead_blocks + 1) // 2 or self.requested >= self.num_blocks \
                or not self.supported:
            return
        lo = self.requested
        hi = min(self.num_blocks, reached + self.ahead_blocks)
        self.requested = hi
        if not self.background:
            self._populate(lo, hi)
            return
        with self._lock:
            if self._pending is not None:  # the worker has not started it yet: widen it
                lo = self._pending[0]
            self._pending = (lo, hi)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="llmctl-kv-prefault", daemon=True)
                self._worker.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                job, self._pending = self._pending, None
                if job is None:
                    self._worker = None
                    return
            self._populate(*job)

    def wait(self) -> None:
        """Until the worker has nothing left (tests; a caller that wants the memory faulted in now)."""
        while True:
            with self._lock:
                worker = self._worker
            if worker is None:
                return
            worker.join()


def blocks_for_bytes(kv_caches: list[torch.Tensor], num_blocks: int, nbytes: int) -> int:
    """How many blocks (over all layers) ``nbytes`` covers."""
    total = sum(t.numel() * t.element_size() for t in kv_caches)
    return min(num_blocks, nbytes * num_blocks // max(total, 1)) if nbytes > 0 else 0
