"""Stall probes inside a server process (``_serve.py --probe-log PATH``) and their attribution (``hostile_mix.py``).

What the soak's canary sees as one slow gap can be a long engine step, a garbage collection (it holds the GIL, so it
stops the engine thread and the event loop together), an event loop busy with other work, or the host not running
the process at all. The probes log each of these with ``time.monotonic()`` (system-wide on Linux, so it lines up with
the canary's own stamps in another process); ``attribute`` then says, for each slow gap, what overlapped it.
Records are JSON lines ``[kind, start, seconds, extra]``, written every second by a daemon thread.
"""

from __future__ import annotations

import asyncio
import bisect
import ctypes
import gc
import json
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

_LAG_PERIOD_S = 0.01
_LOG_OVER_S = 0.005  # lags and oversleeps shorter than this are not logged


def install(engine: Any, path: str) -> None:
    """Hook ``engine`` (an ``AsyncLLM``) and this process: steps, scheduler decisions, preemptions, gc pauses,
    event-loop lag (from the first uvicorn server started), GIL waits."""
    import uvicorn

    records: list[list[Any]] = []
    add = records.append  # list.append is atomic under the GIL: every thread logs without a lock

    def flush() -> None:
        with open(path, "a") as fh:
            while True:
                time.sleep(1.0)
                n = len(records)
                fh.writelines(json.dumps(r) + "\n" for r in records[:n])
                fh.flush()
                del records[:n]

    gc_start: dict[int, float] = {}

    def on_gc(phase: str, info: dict[str, int]) -> None:
        ident = threading.get_ident()
        if phase == "start":
            gc_start[ident] = time.monotonic()
        elif ident in gc_start:
            t = gc_start.pop(ident)
            add(["gc", t, time.monotonic() - t, [info["generation"], info["collected"]]])

    core = engine.engine
    real_step = core.step

    def step() -> Any:
        t = time.monotonic()
        try:
            return real_step()
        finally:
            add(["step", t, time.monotonic() - t, None])

    core.step = step
    sched = getattr(getattr(core, "core", None), "scheduler", None)
    if sched is not None:
        real_schedule, real_preempt = sched.schedule, sched._preempt

        def schedule(*a: Any, **kw: Any) -> Any:
            out = real_schedule(*a, **kw)
            prompt = sum(s.num_new_tokens for s in out.scheduled if s.num_new_tokens > 1)
            add(["sched", time.monotonic(), 0.0, [len(out.scheduled), prompt, len(sched.waiting)]])
            return out

        def preempt(victim: Any) -> None:
            add(["preempt", time.monotonic(), 0.0, victim.request_id])
            real_preempt(victim)

        sched.schedule, sched._preempt = schedule, preempt

    real_startup = uvicorn.Server.startup

    async def startup(self: Any, *a: Any, **kw: Any) -> Any:
        async def lag_probe() -> None:
            while True:
                t = time.monotonic()
                await asyncio.sleep(_LAG_PERIOD_S)
                lag = time.monotonic() - t - _LAG_PERIOD_S
                if lag > _LOG_OVER_S:
                    add(["lag", t, lag, None])

        self._llmctl_lag_probe = asyncio.get_running_loop().create_task(lag_probe())
        return await real_startup(self, *a, **kw)

    def gil_probe() -> None:
        while True:
            t = time.monotonic()
            time.sleep(_LOG_OVER_S)
            over = time.monotonic() - t - _LOG_OVER_S
            if over > _LOG_OVER_S:
                add(["gil", t, over, None])

    uvicorn.Server.startup = startup  # type: ignore[method-assign]
    gc.callbacks.append(on_gc)
    threading.Thread(target=flush, daemon=True, name="probe-flush").start()
    threading.Thread(target=gil_probe, daemon=True, name="probe-gil").start()


def host_probe(path: Path, stop: threading.Event) -> None:
    """Oversleeps of a thread in another process (the canary's): the host not running us, not the server's GIL."""
    rows = []
    while not stop.is_set():
        t = time.monotonic()
        time.sleep(_LOG_OVER_S)
        over = time.monotonic() - t - _LOG_OVER_S
        if over > _LOG_OVER_S:
            rows.append(["host", t, over, None])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pcts(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {}
    return {"n": len(v), "p50_ms": round(v[len(v) // 2] * 1e3, 1), "p99_ms": round(v[int(len(v) * 0.99)] * 1e3, 1),
            "max_ms": round(v[-1] * 1e3, 1)}


def attribute(server_log: Path, host_log: Path, stamps: list[tuple[float, str]], over_s: float) -> dict[str, Any]:
    """For each canary gap of at least ``over_s`` (between two chunks of one stream): the first cause that overlapped
    it, checked in this order: a gc pause over 10 ms, a host oversleep over 10 ms, a canary preemption, a step with
    prompt tokens, a step with 30 or more sequences; else "other". Plus the probes' own distributions."""
    ev: dict[str, list[tuple[float, float, Any]]] = defaultdict(list)
    for log in (server_log, host_log):
        if log.exists():
            for line in log.read_text().splitlines():
                kind, t, dur, extra = json.loads(line)
                ev[kind].append((t, dur, extra))
    for rows in ev.values():
        rows.sort(key=lambda r: r[0])
    starts = {k: [r[0] for r in rows] for k, rows in ev.items()}

    def overlapping(kind: str, a: float, b: float, lookback: float = 1.0) -> list[tuple[float, float, Any]]:
        rows, ts = ev.get(kind, []), starts.get(kind, [])
        lo, hi = bisect.bisect_left(ts, a - lookback), bisect.bisect_right(ts, b)
        return [r for r in rows[lo:hi] if r[0] + r[1] > a]

    causes: Counter[str] = Counter()
    gaps = [(t1 - t0, t0, t1, rid) for (t0, rid), (t1, rid1) in zip(stamps, stamps[1:]) if rid == rid1]
    for gap, a, b, rid in gaps:
        if gap < over_s:
            continue
        sched = overlapping("sched", a - 0.2, b, 0.0)
        if any(r[1] > 0.01 for r in overlapping("gc", a, b)):
            causes["gc pause > 10 ms"] += 1
        elif any(r[1] > 0.01 for r in overlapping("host", a, b)):
            causes["host oversleep > 10 ms"] += 1
        elif any(str(r[2]).startswith(rid) for r in overlapping("preempt", a - 0.5, b, 0.0)):
            causes["canary preempted"] += 1
        elif any(r[2][1] > 0 for r in sched):
            causes["step with prompt tokens"] += 1
        elif any(r[2][0] >= 30 for r in sched):
            causes["step with >= 30 sequences"] += 1
        else:
            causes["other"] += 1
    by_gen = {f"gen{g}": _pcts([r[1] for r in ev.get("gc", []) if r[2][0] == g]) for g in (0, 1, 2)}
    span = (stamps[-1][0] - stamps[0][0]) if len(stamps) > 1 else 0.0
    collected = sum(r[2][1] for r in ev.get("gc", []) if stamps and stamps[0][0] <= r[0] <= stamps[-1][0])
    return {"gaps": len(gaps), f"gaps_over_{int(over_s * 1e3)}ms": sum(causes.values()), "causes": dict(causes),
            "steps": _pcts([r[1] for r in ev.get("step", [])]), "gc": by_gen,
            "gc_collected_per_s": round(collected / span, 1) if span else None,
            "loop_lag": _pcts([r[1] for r in ev.get("lag", [])]), "gil_wait": _pcts([r[1] for r in ev.get("gil", [])]),
            "host_oversleep": _pcts([r[1] for r in ev.get("host", [])]), "preemptions": len(ev.get("preempt", []))}


# -- memory at quiescent points (benchmarks/soak/memory_rounds.py) ---------------------------------------------------
class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo2() -> dict[str, int]:
    """glibc's heap statistics (all arenas): ``uordblks`` is in use, ``fordblks`` free inside the heap, ``hblkhd``
    mmapped blocks. Empty off glibc 2.33+."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _Mallinfo2
    m = fn()
    return {name: int(getattr(m, name)) for name, _ in _Mallinfo2._fields_}


def _smaps_kib(big: dict[str, int] | None = None) -> dict[str, int]:
    """Anonymous resident KiB by kind of mapping: the brk heap, 1 MiB mappings (pymalloc's arenas), the rest; with
    ``big``, also each other anonymous mapping holding over 256 KiB ("start-end": KiB) into it."""
    out: Counter[str] = Counter()
    kind, where = "", ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            name = head[5] if len(head) > 5 else ""
            kind = "heap" if name == "[heap]" else ("file" if name.startswith("/") else
                                                  ("arena_1mib" if hi - lo == 1 << 20 else "other_anon"))
            where = head[0]
        elif head[0] == "Anonymous:":
            out[kind] += int(head[1])
            if big is not None and kind == "other_anon" and int(head[1]) > 256:
                big[where] = int(head[1])
    return dict(out)


def memory_snapshot(top: int = 30) -> dict[str, Any]:
    """What a quiescent server holds: RssAnon by mapping kind, glibc's in-use bytes, Python's allocated blocks and
    gc-tracked objects by type (the ``top`` most numerous)."""
    status = {k: v for k, v in (line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())}
    by_type = Counter(type(o).__qualname__ for o in gc.get_objects())
    big: dict[str, int] = {}
    return {"t": time.monotonic(), "rss_anon_kib": int(status["RssAnon"].split()[0]), "smaps": _smaps_kib(big),
            "other_anon_mappings": big,
            "mallinfo2": mallinfo2(), "py_blocks": sys.getallocatedblocks(), "gc_objects": sum(by_type.values()),
            "by_type": dict(by_type.most_common(top)), "threads": threading.active_count()}


def install_memory_probe(path: str) -> None:
    """Answer snapshot requests from another process: it writes ``PATH.req`` ("snap", or "snap trace N" to start
    tracemalloc with N frames after this snapshot and dump a tracemalloc snapshot with every later one to
    ``PATH.N.tm``); this thread appends ``memory_snapshot()`` as a JSON line to PATH and removes the request."""
    import tracemalloc

    req = Path(path + ".req")

    def serve() -> None:
        n = 0
        while True:
            time.sleep(0.1)
            if not req.exists():
                continue
            words = req.read_text().split()
            snap = memory_snapshot()
            if tracemalloc.is_tracing():
                snap["tracemalloc"] = f"{path}.{n}.tm"
                tracemalloc.take_snapshot().dump(snap["tracemalloc"])
                snap["traced_kib"] = tracemalloc.get_traced_memory()[0] // 1024
            with open(path, "a") as fh:
                fh.write(json.dumps(snap) + "\n")
            if words[1:2] == ["trace"] and not tracemalloc.is_tracing():
                tracemalloc.start(int(words[2]) if len(words) > 2 else 8)
            n += 1
            req.unlink()

    threading.Thread(target=serve, daemon=True, name="probe-memory").start()
