#!/usr/bin/env python
"""What it costs the ``mp`` executor to hand one step's message to its local ranks: the shared-memory ring with a
msgspec-typed message (encoded once, read by every rank from the same pages) against the previous transport (the
message pickled once, then written into each rank's pipe and unpickled by each rank), in the same run.

Each "rank" here is a spawned process that does what a worker does with a step message (reads it, decodes it into
``Request`` objects) and then acknowledges on its own pipe, as rank 0 answers each step. A step's time runs from
the start of encoding to the last acknowledgement; "send" is the driver's own part (encode, write, and the empty
doorbells for ranks asleep on the ring). ``--gap-us`` idles the driver between steps, as its output processing
does, so ranks go to sleep and have to be woken: that latency is part of the figure.

    .venv/bin/python benchmarks/step_broadcast.py --ranks 2 --out step_broadcast.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import platform
import statistics
import time
from typing import Any


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_ops(num_requests: int, prompt_len: int, step: int) -> list[Any]:
    from llmctl.engine.request import Request
    from llmctl.executor import messages as msg
    from llmctl.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=128, stop=["\n\n"], seed=None)
    if num_requests == 0:
        return []
    requests = [Request(f"req-{step}-{i}", [(i * 7 + k) % 32000 for k in range(prompt_len)], params,
                        arrival_time=time.time(), eos_token_ids=(2,), max_tokens=128) for i in range(num_requests)]
    return [(msg.ADD, requests)]


def _rank(mode: str, name: str | None, index: int, conn: Any, bell: Any) -> None:
    from llmctl.executor import step_codec

    reader = block = None
    if mode == "shm":
        from llmctl.executor.shm_ring import ShmRingReader, doorbell_block

        reader = ShmRingReader(name, index)
        block = doorbell_block(bell.fileno())
    conn.send_bytes(b"ready")
    while True:
        if reader is not None:
            kind, ops = step_codec.decode_step(reader.read(timeout=120, block=block))
        else:
            kind, ops = pickle.loads(conn.recv_bytes())
        if kind == "shutdown":
            break
        conn.send_bytes(b"")
    if reader is not None:
        reader.close()


def run_case(mode: str, ranks: int, num_requests: int, prompt_len: int, steps: int, warmup: int,
             gap_us: float) -> dict[str, Any]:
    from llmctl.executor.remote import encode_ops
    from llmctl.executor.shm_ring import ShmRingWriter, ring_doorbell

    ctx = mp.get_context("spawn")
    ring = ShmRingWriter(ranks) if mode == "shm" else None
    pipes = [ctx.Pipe(duplex=True) for _ in range(ranks)]
    bells = [ctx.Pipe(duplex=False) for _ in range(ranks)]  # (read end, write end)
    procs = [ctx.Process(target=_rank, args=(mode, None if ring is None else ring.name, r, pipes[r][1], bells[r][0]),
                         daemon=True) for r in range(ranks)]
    for p in procs:
        p.start()
    conns = [ours for ours, _ in pipes]
    bell_fds = [w.fileno() for _, w in bells]
    for fd in bell_fds:
        os.set_blocking(fd, False)
    for c in conns:
        assert c.recv_bytes() == b"ready"
    all_ops = [make_ops(num_requests, prompt_len, s) for s in range(warmup + steps)]
    totals: list[float] = []
    sends: list[float] = []
    size = 0
    for s, ops in enumerate(all_ops):
        if gap_us:
            time.sleep(gap_us * 1e-6)
        t0 = time.perf_counter()
        if ring is not None:
            payload = encode_ops("step", ops)
            ring.write(payload, timeout=120, wake=lambda r: ring_doorbell(bell_fds[r]))
        else:
            payload = pickle.dumps(("step", ops), protocol=pickle.HIGHEST_PROTOCOL)
            for c in conns:
                c.send_bytes(payload)
        t1 = time.perf_counter()
        for c in conns:
            c.recv_bytes()
        t2 = time.perf_counter()
        if s >= warmup:
            sends.append(t1 - t0)
            totals.append(t2 - t0)
            size = len(payload)
    if ring is not None:
        ring.write(encode_ops("shutdown", []), timeout=30)
    else:
        for c in conns:
            c.send_bytes(pickle.dumps(("shutdown", [])))
    for p in procs:
        p.join(30)
    if ring is not None:
        ring.close()
    return {"mode": mode, "ranks": ranks, "requests": num_requests, "prompt_len": prompt_len, "gap_us": gap_us,
            "bytes": size, "steps": steps, "step_us_median": statistics.median(totals) * 1e6,
            "step_us_mean": statistics.fmean(totals) * 1e6, "send_us_median": statistics.median(sends) * 1e6}


def codec_costs(num_requests: int, prompt_len: int, reps: int = 20) -> dict[str, float]:
    """Encode and decode alone, in this process (no transport): best of 5 means over ``reps`` steps."""
    from llmctl.executor import step_codec
    from llmctl.executor.remote import encode_ops

    ops = make_ops(num_requests, prompt_len, 0)
    out: dict[str, float] = {}
    for name, enc, dec in (("pickle", lambda: pickle.dumps(("step", ops), protocol=pickle.HIGHEST_PROTOCOL),
                            pickle.loads),
                           ("msgspec", lambda: encode_ops("step", ops), step_codec.decode_step)):
        payload = enc()
        out[f"{name}_encode_us"] = min(_mean_time(enc, reps) for _ in range(5)) * 1e6
        out[f"{name}_decode_us"] = min(_mean_time(lambda p=payload, d=dec: d(p), reps) for _ in range(5)) * 1e6
    return out


def _mean_time(fn: Any, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--requests", type=int, nargs="+", default=[0, 16, 256],
                    help="new requests in the step (0: a decode step with no request changes)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--gap-us", type=float, nargs="+", default=[0.0, 2000.0])
    ap.add_argument("--modes", nargs=2, default=["pipe", "shm"], choices=["pipe", "shm"],
                    help="the order the two transports run in, per case (swap it to see the load's drift)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    load_before = os.getloadavg()
    rows = []
    for n in a.requests:
        steps = a.steps if n <= 16 else max(20, a.steps // 4)
        for gap in a.gap_us:
            pair = {m: run_case(m, a.ranks, n, a.prompt_len, steps, a.warmup, gap) for m in a.modes}
            for m in ("pipe", "shm"):
                rows.append(pair[m])
            p, s = pair["pipe"], pair["shm"]
            print(f"{n:4d} requests, gap {gap:6.0f} us | pipe+pickle {p['step_us_median']:9.1f} us/step "
                  f"(send {p['send_us_median']:8.1f}, {p['bytes']:8d} B) | shm+msgspec {s['step_us_median']:9.1f} "
                  f"us/step (send {s['send_us_median']:8.1f}, {s['bytes']:8d} B) | shm/pipe "
                  f"{s['step_us_median'] / p['step_us_median']:.2f}", flush=True)
    codec = {n: codec_costs(n, a.prompt_len) for n in a.requests if n}
    for n, c in codec.items():
        print(f"{n:4d} requests, codec only | pickle encode {c['pickle_encode_us']:8.1f} decode "
              f"{c['pickle_decode_us']:8.1f} us | msgspec encode {c['msgspec_encode_us']:8.1f} decode "
              f"{c['msgspec_decode_us']:8.1f} us", flush=True)
    load_after = os.getloadavg()
    result = {"codec": codec, "host": _cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "load_before": load_before, "load_after": load_after, "rows": rows}
    print(f"host: {result['host']}, {result['cpus']} CPUs; load average before {load_before}, after {load_after}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
