"""The shared-memory ring that carries each step's message to the local ranks: order across wrap-around, messages
larger than a slot and than the whole ring, a reader or a writer that dies, idle readers that sleep rather than
spin, and no segment left in /dev/shm on any way out."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from llmctl.executor.shm_ring import (
    NAME_PREFIX,
    RingClosed,
    ShmRingReader,
    ShmRingWriter,
    WriterGone,
    doorbell_block,
    ring_doorbell,
)

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs POSIX shared memory in /dev/shm")

ROOT = Path(__file__).resolve().parents[1]


def _segment(name: str) -> Path:
    return Path("/dev/shm") / name


def _message(i: int) -> bytes:
    # sizes from empty to several slots, so chunks and whole messages wrap at every offset
    return bytes((i + k) % 251 for k in range((i * 37) % 300))


def _read_all(reader: ShmRingReader, count: int, out: list[bytes]) -> None:
    for _ in range(count):
        out.append(reader.read(timeout=30))


def test_messages_arrive_in_order_across_wrap_around_for_every_reader():
    writer = ShmRingWriter(n_readers=3, n_slots=4, slot_bytes=64)
    readers = [ShmRingReader(writer.name, i) for i in range(3)]
    got: list[list[bytes]] = [[] for _ in readers]
    threads = [threading.Thread(target=_read_all, args=(r, 200, got[i])) for i, r in enumerate(readers)]
    try:
        for t in threads:
            t.start()
        for i in range(200):
            writer.write(_message(i), timeout=30)
        for t in threads:
            t.join(60)
        want = [_message(i) for i in range(200)]
        assert all(g == want for g in got)
    finally:
        for r in readers:
            r.close()
        writer.close()
    assert not _segment(writer.name).exists()


def _digest_reader(name: str, index: int, count: int, conn) -> None:
    reader = ShmRingReader(name, index)
    try:
        conn.send([hashlib.sha256(reader.read(timeout=60)).hexdigest() for _ in range(count)])
    finally:
        reader.close()


def test_large_messages_are_chunked_not_truncated_across_processes():
    """A message 25 times a slot and 6 times the whole ring reaches two reader processes whole."""
    ctx = mp.get_context("spawn")
    writer = ShmRingWriter(n_readers=2, n_slots=4, slot_bytes=4096)
    payloads = [os.urandom(100_000), b"small", os.urandom(4096 * 4), os.urandom(4097)]
    pipes = [ctx.Pipe(duplex=False) for _ in range(2)]
    procs = [ctx.Process(target=_digest_reader, args=(writer.name, i, len(payloads), pipes[i][1]))
             for i in range(2)]
    try:
        for p in procs:
            p.start()
        for m in payloads:
            writer.write(m, timeout=60)
        want = [hashlib.sha256(m).hexdigest() for m in payloads]
        for recv, _ in pipes:
            assert recv.poll(60)
            assert recv.recv() == want
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        writer.close()
    assert not _segment(writer.name).exists()


def _slow_reader(name: str, index: int) -> None:
    reader = ShmRingReader(name, index)
    reader.read(timeout=60)
    time.sleep(600)  # then stops reading: the test kills it


def test_a_dead_reader_stops_the_writer_within_its_check_not_a_hang():
    ctx = mp.get_context("spawn")
    writer = ShmRingWriter(n_readers=2, n_slots=2, slot_bytes=16)
    fast = ShmRingReader(writer.name, 0)
    proc = ctx.Process(target=_slow_reader, args=(writer.name, 1))
    proc.start()

    def check() -> None:
        if proc.exitcode is not None:
            raise RuntimeError(f"reader exited with {proc.exitcode}")

    try:
        for i in range(3):  # the slow reader takes the first; two fill the ring
            writer.write(bytes([i]), timeout=60, check=check)
            assert fast.read(timeout=60) == bytes([i])
        os.kill(proc.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="reader exited"):
            writer.write(b"next", timeout=60, check=check)
        assert time.monotonic() - start < 10
        # and with no check at all, the timeout bounds it
        with pytest.raises(TimeoutError, match="every reader taking message"):
            writer.write(b"next", timeout=0.5)
    finally:
        proc.kill()
        proc.join(10)
        fast.close()
        writer.close()
    assert not _segment(writer.name).exists()


_WRITER = """
import sys, time
from llmctl.executor.shm_ring import ShmRingWriter
w = ShmRingWriter(n_readers=1, n_slots=2, slot_bytes=32)
w.write(b"hello")
print(w.name, flush=True)
time.sleep(600)
"""


def test_a_dead_writer_ends_the_reader_and_its_segment_is_cleaned_up():
    """The engine killed outright: the waiting reader raises ``WriterGone`` within a bounded time instead of
    waiting forever, and the writer's resource tracker unlinks the segment it never got to unlink."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "core"), os.environ.get("PYTHONPATH", "")])}
    writer = subprocess.Popen([sys.executable, "-c", _WRITER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    try:
        name = writer.stdout.readline().strip()
        assert name.startswith(NAME_PREFIX), writer.stderr.read()[-2000:]
        reader = ShmRingReader(name, 0)
        assert reader.read(timeout=30) == b"hello"
        failure: list[BaseException] = []

        def wait_next() -> None:
            try:
                reader.read()  # no timeout: only the writer's death can end this
            except BaseException as exc:
                failure.append(exc)

        t = threading.Thread(target=wait_next)
        t.start()
        time.sleep(0.3)
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        start = time.monotonic()
        t.join(10)
        assert not t.is_alive() and time.monotonic() - start < 5
        assert isinstance(failure[0], WriterGone), failure
        reader.close()
        deadline = time.monotonic() + 10
        while _segment(name).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _segment(name).exists(), "the killed writer's segment was left in /dev/shm"
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(10)


def test_an_idle_reader_sleeps_rather_than_spins():
    writer = ShmRingWriter(n_readers=1, n_slots=2, slot_bytes=16)
    reader = ShmRingReader(writer.name, 0)
    cpu: list[float] = []

    def idle() -> None:
        start = time.thread_time()
        with pytest.raises(TimeoutError):
            reader.read(timeout=2.0)
        cpu.append(time.thread_time() - start)

    try:
        t = threading.Thread(target=idle)
        t.start()
        t.join(30)
        # a spinning reader would burn most of the 2 s (or its whole share of a loaded machine)
        assert cpu and cpu[0] < 0.15, cpu
    finally:
        reader.close()
        writer.close()


def test_a_sleeping_reader_is_rung_awake_and_ends_when_its_doorbell_closes():
    """A reader that went to sleep on its doorbell pipe is woken by the writer (only it: an awake reader is not
    rung), and end-of-file on the doorbell ends its wait as ``WriterGone``."""
    writer = ShmRingWriter(n_readers=2, n_slots=2, slot_bytes=16)
    reader = ShmRingReader(writer.name, 1)
    awake = ShmRingReader(writer.name, 0)
    bell_r, bell_w = os.pipe()
    os.set_blocking(bell_w, False)
    rung: list[int] = []
    got: list[bytes] = []
    failure: list[BaseException] = []

    def wake(i: int) -> None:
        rung.append(i)
        ring_doorbell(bell_w)

    def read_twice() -> None:
        try:
            got.append(reader.read(timeout=30, block=doorbell_block(bell_r)))
            reader.read(block=doorbell_block(bell_r))  # no timeout: only the doorbell's end can end it
        except BaseException as exc:
            failure.append(exc)

    t = threading.Thread(target=read_twice)
    try:
        t.start()
        time.sleep(0.5)  # long past the spin: asleep on the pipe
        writer.write(b"wake up", timeout=30, wake=wake)
        assert awake.read(timeout=30) == b"wake up"
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [b"wake up"] and rung == [1]
        time.sleep(0.3)
        os.close(bell_w)
        bell_w = -1
        t.join(10)
        assert not t.is_alive() and isinstance(failure[0], WriterGone), failure
    finally:
        if bell_w >= 0:
            os.close(bell_w)
        t.join(10)
        os.close(bell_r)
        reader.close()
        awake.close()
        writer.close()


def test_close_wakes_a_waiting_reader_and_unlinks_the_segment():
    writer = ShmRingWriter(n_readers=1)
    reader = ShmRingReader(writer.name, 0)
    assert _segment(writer.name).exists()
    threading.Timer(0.2, writer.close).start()
    with pytest.raises(RingClosed):
        reader.read(timeout=30)
    reader.close()
    assert not _segment(writer.name).exists()
    writer.close()  # idempotent
    with pytest.raises(RingClosed):
        writer.write(b"late")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n_readers: must be >= 1"):
        ShmRingWriter(n_readers=0)
    with pytest.raises(ValueError, match="slot_bytes: must be >= 1"):
        ShmRingWriter(n_readers=1, slot_bytes=0)
    writer = ShmRingWriter(n_readers=2, n_slots=1, slot_bytes=8)
    try:
        with pytest.raises(ValueError, match=r"reader_index: must be in \[0, 2\), got 2"):
            ShmRingReader(writer.name, 2)
    finally:
        writer.close()
    with pytest.raises(FileNotFoundError):
        ShmRingReader(writer.name, 0)
