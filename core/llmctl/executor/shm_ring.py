"""A single-writer, many-reader ring of fixed-size slots in one POSIX shared-memory segment: the engine writes each
step's message once and every local rank reads it from the same pages, as vLLM's ``ShmRingBuffer`` does, instead
of the driver writing one copy per rank into per-rank pipes.

Layout: a 64-byte segment header (magic, slot count, reader count, slot size, writer pid, closed flag), then the
slots. A slot is a header (sequence number, the message's total length, this chunk's length, one read flag per
reader) followed by ``slot_bytes`` of payload. Sequence numbers start at 1 and message ``k``'s first chunk lands in
slot ``(k - 1) % n_slots``.

The protocol relies on stores becoming visible in program order (x86's TSO; the same assumption as vLLM's):

* The writer may reuse a slot only once every reader has set its read flag there. It then clears the flags,
  writes the payload and both lengths, and writes the sequence number last: a reader that sees the sequence it
  expects sees the payload too (a torn 8-byte store cannot read as the new number before all its bytes are new).
* A reader waits for the sequence it expects, copies the chunk out, then sets its own flag.
* A message larger than a slot is written as consecutive chunks, each in the next slot, every chunk carrying the
  total length; the readers reassemble it. Nothing is ever truncated: a message larger than the whole ring just
  waits for the readers to free slots as they consume the earlier chunks.

Nobody busy-waits for long: a waiter spins a few rounds, then sleeps, and every ``CHECK_INTERVAL_S`` calls its
``check`` (which raises to give up: a dead rank, a gone driver) and, for readers, looks whether the writer's
process still exists. Every wait has a deadline when given one.

A reader sleeps in one of two ways. Given a ``block`` callable (the ``mp`` ranks pass :func:`doorbell_block`,
which waits on a pipe), it raises its "asleep" flag in the segment header, looks once more for the message, and
blocks; after publishing a chunk the writer clears every raised flag and calls ``wake(reader)``
(:func:`ring_doorbell`: one byte into that reader's doorbell pipe), so a sleeping rank wakes as soon as the kernel
schedules it rather than at its next timer tick. The flag and the message can cross (x86 may order a store after
a later load), so a wake-up can be missed: ``block`` is always given a timeout, and a missed one costs at most
``CHECK_INTERVAL_S``. Without ``block`` a reader sleeps with a growing back-off.
"""

from __future__ import annotations

import math
import mmap
import os
import secrets
import select
import struct
import time
import weakref
from collections.abc import Callable
from multiprocessing import shared_memory

NAME_PREFIX = "llmctl_ring_"
_MAGIC = 0x31_42_52_4C_54_43_4D_4C  # "LMCTLRB1"
_HEADER = struct.Struct("<QIIQQB")  # magic, n_slots, n_readers, slot_bytes, writer pid, closed
_FIXED_HEADER_BYTES = 64  # then one "asleep" flag per reader, padded to 64 bytes
_CLOSED_AT = struct.calcsize("<QIIQQ")
_SLOT = struct.Struct("<QQQ")  # sequence number, total length of the message, length of this chunk
_SEQ = struct.Struct("<Q")

SPIN_ROUNDS = 64
SLEEP_MIN_S = 20e-6
SLEEP_MAX_S = 500e-6  # while the step loop is busy: the added latency per step stays under this
IDLE_AFTER_S = 0.2
SLEEP_IDLE_S = 5e-3  # an idle engine: a few hundred wake-ups a second per rank
CHECK_INTERVAL_S = 0.05  # also the longest a blocked reader sleeps past a missed wake-up


class RingClosed(Exception):
    """The writer closed the ring: an orderly end, not a failure."""


class WriterGone(RuntimeError):
    """The writer's process no longer exists (the engine died without closing the ring)."""


def _slot_header_bytes(n_readers: int) -> int:
    return _SLOT.size + -(-n_readers // 8) * 8


def _header_bytes(n_readers: int) -> int:
    return _FIXED_HEADER_BYTES + -(-n_readers // 64) * 64


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited too
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (FileNotFoundError, IndexError):
        return True  # no /proc: trust kill()


class _Waiter:
    """Spin, then sleep with back-off; raise ``TimeoutError`` past the deadline, run ``check`` now and then."""

    def __init__(self, timeout: float | None, check: Callable[[], None] | None, what: Callable[[], str]) -> None:
        self.start = time.monotonic()
        self.deadline = None if timeout is None else self.start + timeout
        self.check = check
        self.what = what
        self.rounds = 0
        self.sleep = SLEEP_MIN_S
        self.next_check = self.start + CHECK_INTERVAL_S

    def pause(self, block: Callable[[float], None] | None = None) -> None:
        """One round of waiting; ``block(seconds)`` (already armed for a wake-up) replaces the sleep."""
        self.rounds += 1
        if self.rounds <= SPIN_ROUNDS:
            return
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise TimeoutError(f"shared-memory ring: {self.what()} did not happen within "
                               f"{self.deadline - self.start:g} s")
        if now >= self.next_check:
            self.next_check = now + CHECK_INTERVAL_S
            if self.check is not None:
                self.check()
        if block is not None:
            limit = self.next_check - now
            if self.deadline is not None:
                limit = min(limit, self.deadline - now)
            block(max(limit, 0.0))
        elif now - self.start > IDLE_AFTER_S:
            time.sleep(SLEEP_IDLE_S)
        else:
            time.sleep(self.sleep)
            self.sleep = min(self.sleep * 2, SLEEP_MAX_S)


class ShmRingWriter:
    """The engine's end: creates (and alone unlinks) the segment. ``n_readers`` readers must each read every
    message, or the writer stalls once the ring is full (bounded by the ``timeout`` of :meth:`write`)."""

    def __init__(self, n_readers: int, n_slots: int = 8, slot_bytes: int = 1 << 19) -> None:
        if n_readers < 1:
            raise ValueError(f"n_readers: must be >= 1, got {n_readers}")
        if n_slots < 1:
            raise ValueError(f"n_slots: must be >= 1, got {n_slots}")
        if slot_bytes < 1:
            raise ValueError(f"slot_bytes: must be >= 1, got {slot_bytes}")
        self.n_readers, self.n_slots, self.slot_bytes = n_readers, n_slots, slot_bytes
        self._stride = _slot_header_bytes(n_readers) + slot_bytes
        self._slots_at = _header_bytes(n_readers)
        size = self._slots_at + n_slots * self._stride
        # Registered with multiprocessing's resource tracker: if this process is killed, the tracker unlinks the
        # segment once the last process sharing the tracker (this one and its spawned ranks) has exited.
        self._shm = shared_memory.SharedMemory(name=f"{NAME_PREFIX}{os.getpid()}_{secrets.token_hex(6)}",
                                               create=True, size=size)
        self._buf = self._shm.buf
        _HEADER.pack_into(self._buf, 0, _MAGIC, n_slots, n_readers, slot_bytes, os.getpid(), 0)
        self._seq = 0
        self._all_read = b"\x01" * n_readers
        self._no_reads = bytes(n_readers)
        self._finalizer = weakref.finalize(self, _close_writer, self._shm)

    @property
    def name(self) -> str:
        return self._shm.name

    def write(self, payload: bytes | bytearray | memoryview, timeout: float | None = None,
              check: Callable[[], None] | None = None, wake: Callable[[int], None] | None = None) -> None:
        """Publish ``payload`` to every reader; chunked over several slots when larger than one.
        ``check`` runs while waiting for a slot and raises to give up (e.g. a reader's process has exited);
        ``wake(reader_index)`` is called for each reader that went to sleep in its ``block``."""
        if not self._finalizer.alive:
            raise RingClosed("shared-memory ring: write after close")
        data = memoryview(payload).cast("B")
        total = len(data)
        seq = self._seq + 1
        waiter = _Waiter(timeout, check, lambda: f"every reader taking message {seq} ({total} bytes)")
        pos = 0
        while True:
            chunk = data[pos:pos + self.slot_bytes]
            self._write_chunk(chunk, total, waiter)
            if wake is not None:
                self._wake_sleepers(wake)
            pos += len(chunk)
            if pos >= total:
                return

    def _wake_sleepers(self, wake: Callable[[int], None]) -> None:
        buf = self._buf
        asleep = bytes(buf[_FIXED_HEADER_BYTES:_FIXED_HEADER_BYTES + self.n_readers])
        if asleep == self._no_reads:
            return
        for r, flag in enumerate(asleep):
            if flag:
                buf[_FIXED_HEADER_BYTES + r] = 0
                wake(r)

    def _write_chunk(self, chunk: memoryview, total: int, waiter: _Waiter) -> None:
        buf, seq = self._buf, self._seq + 1
        base = self._slots_at + ((seq - 1) % self.n_slots) * self._stride
        flags = base + _SLOT.size
        if seq > self.n_slots:  # the slot held message seq - n_slots: wait until everyone has read it
            while bytes(buf[flags:flags + self.n_readers]) != self._all_read:
                waiter.pause()
        buf[flags:flags + self.n_readers] = self._no_reads
        start = base + _slot_header_bytes(self.n_readers)
        buf[start:start + len(chunk)] = chunk
        struct.pack_into("<QQ", buf, base + 8, total, len(chunk))
        _SEQ.pack_into(buf, base, seq)  # last: publishes the chunk
        self._seq = seq

    def close(self) -> None:
        """Tell the readers the ring is closed, then unlink the segment (idempotent; readers keep their mapping
        until they close it)."""
        self._finalizer()


def _close_writer(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.buf[_CLOSED_AT] = 1
    except (TypeError, ValueError):  # already released
        pass
    try:
        shm.close()
    except BufferError:  # a memoryview of the buffer is still alive somewhere: the mapping goes with the process
        pass
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


def _attach(name: str) -> mmap.mmap:
    """Map an existing segment without registering it with this process's resource tracker: a reader must never
    unlink (or make its tracker unlink) the writer's segment when it exits."""
    import _posixshmem

    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


class ShmRingReader:
    """One rank's end: reads every message in order. ``reader_index`` in ``[0, n_readers)``, one per reader."""

    def __init__(self, name: str, reader_index: int) -> None:
        self._map = _attach(name)
        self._buf = memoryview(self._map)
        magic, self.n_slots, self.n_readers, self.slot_bytes, self.writer_pid, _ = _HEADER.unpack_from(self._buf, 0)
        if magic != _MAGIC:
            self.close()
            raise ValueError(f"shared-memory segment {name!r} is not an llmctl ring")
        if not 0 <= reader_index < self.n_readers:
            self.close()
            raise ValueError(f"reader_index: must be in [0, {self.n_readers}), got {reader_index}")
        self.index = reader_index
        self._stride = _slot_header_bytes(self.n_readers) + self.slot_bytes
        self._slots_at = _header_bytes(self.n_readers)
        self._asleep_at = _FIXED_HEADER_BYTES + reader_index
        self._seq = 0

    @property
    def closed(self) -> bool:
        """Whether the writer closed the ring (an orderly end), as opposed to vanishing."""
        return self._buf is not None and bool(self._buf[_CLOSED_AT])

    def _check_writer(self, check: Callable[[], None] | None) -> None:
        if check is not None:
            check()
        if not _pid_alive(self.writer_pid):
            raise WriterGone(f"shared-memory ring: the writer (pid {self.writer_pid}) has exited")

    def read(self, timeout: float | None = None, check: Callable[[], None] | None = None,
             block: Callable[[float], None] | None = None) -> bytes:
        """The next message. Raises ``RingClosed`` once the writer has closed the ring, ``WriterGone`` if its
        process died, ``TimeoutError`` past ``timeout`` seconds, or whatever ``check`` raises. ``block(seconds)``:
        how to sleep until the writer's ``wake`` for this reader (or the timeout); it may raise to give up too."""
        seq = self._seq + 1
        waiter = _Waiter(timeout, lambda: self._check_writer(check), lambda: f"message {seq} arriving")
        total, chunk = self._read_chunk(waiter, block)
        if len(chunk) == total:
            return chunk
        parts = [chunk]
        got = len(chunk)
        while got < total:
            _, chunk = self._read_chunk(waiter, block)
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _read_chunk(self, waiter: _Waiter, block: Callable[[float], None] | None) -> tuple[int, bytes]:
        buf, seq = self._buf, self._seq + 1
        base = self._slots_at + ((seq - 1) % self.n_slots) * self._stride
        while _SEQ.unpack_from(buf, base)[0] != seq:
            if buf[_CLOSED_AT]:
                raise RingClosed("shared-memory ring: closed by the writer")
            if block is None or waiter.rounds < SPIN_ROUNDS:
                waiter.pause()
                continue
            buf[self._asleep_at] = 1  # then look once more: the writer may have published meanwhile
            try:
                if _SEQ.unpack_from(buf, base)[0] != seq:
                    waiter.pause(block)
            finally:
                buf[self._asleep_at] = 0
        total, length = struct.unpack_from("<QQ", buf, base + 8)
        start = base + _slot_header_bytes(self.n_readers)
        chunk = bytes(buf[start:start + length])
        buf[base + _SLOT.size + self.index] = 1
        self._seq = seq
        return total, chunk

    def close(self) -> None:
        buf, self._buf = getattr(self, "_buf", None), None
        if buf is not None:
            buf.release()
        if not self._map.closed:
            self._map.close()


def doorbell_block(fd: int) -> Callable[[float], None]:
    """A reader's ``block``: wait on the read end ``fd`` of its doorbell pipe. End-of-file there means the
    writer's side closed it (an orderly stop, or the writer's process died): ``WriterGone``."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)

    def block(seconds: float) -> None:
        if poller.poll(math.ceil(seconds * 1000) if seconds > 0 else 0) and not os.read(fd, 4096):
            raise WriterGone("shared-memory ring: the writer closed the doorbell pipe")

    return block


def ring_doorbell(fd: int) -> None:
    """The writer's ``wake`` for one reader: a byte into the write end ``fd`` (set non-blocking) of its doorbell
    pipe. A full pipe already holds wake-ups the reader has not drained, so nothing is lost by skipping one."""
    try:
        os.write(fd, b"\0")
    except (BlockingIOError, BrokenPipeError):
        pass
