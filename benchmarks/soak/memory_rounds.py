"""Where a served engine's memory goes: the soak's hostile mix in rounds, a memory snapshot at each quiescent point.

    .venv/bin/python benchmarks/soak/memory_rounds.py --rounds 8 --round-seconds 40 [--trace-from 5]

One server (the tiny Llama, ``hostile_mix.py``'s flags), a KV fill and ``--warmup-seconds`` of the mix, then
``--rounds`` rounds of ``--round-seconds``; after each, once idle and trimmed, the server reports (in-process, from
``_probe.memory_snapshot``) RssAnon by mapping kind, glibc's in-use bytes (``mallinfo2``), Python's allocated blocks
and gc-tracked objects by type. In-use bytes that grow with requests are a leak; RssAnon growing over flat in-use
bytes is the allocator's fragmentation. With ``--trace-from K`` tracemalloc starts after round K's snapshot (not
before: it changes what malloc sees) and the report ends with the top allocation sites grown between the last two
snapshots. Prints one JSON object (rows and per-1,000-request slopes over the rounds after the first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "soak"))

from hostile_mix import (  # noqa: E402
    LONG_PREFILL_TOKEN_THRESHOLD,
    MAX_NUM_BATCHED_TOKENS,
    _fill_kv,
    _run,
)

from tests.reliability.conftest import spawn_server, stop_server, wait_idle_metrics  # noqa: E402


def _finished(m: dict[str, float]) -> int:
    return int(sum(v for k, v in m.items() if k.startswith("llmctl_requests_finished_total")))


def _snapshot(probe: Path, command: str = "snap", timeout: float = 120.0) -> dict:
    n = len(probe.read_text().splitlines()) if probe.exists() else 0
    Path(str(probe) + ".req").write_text(command)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = probe.read_text().splitlines() if probe.exists() else []
        if len(lines) > n:
            return json.loads(lines[-1])
        time.sleep(0.1)
    raise TimeoutError("no memory snapshot")


def _row(snap: dict, requests: int) -> dict:
    mi = snap.get("mallinfo2", {})
    return {"requests": requests, "rss_anon_kib": snap["rss_anon_kib"], **{f"anon_{k}_kib": v for k, v in
            sorted(snap["smaps"].items())}, "malloc_in_use_kib": (mi.get("uordblks", 0) + mi.get("hblkhd", 0)) // 1024,
            "malloc_free_kib": mi.get("fordblks", 0) // 1024, "malloc_arena_kib": mi.get("arena", 0) // 1024,
            "py_blocks": snap["py_blocks"], "gc_objects": snap["gc_objects"], "threads": snap["threads"],
            **({"traced_kib": snap["traced_kib"]} if "traced_kib" in snap else {})}


def _slopes(rows: list[dict]) -> dict:
    """Per 1,000 engine requests, from the first row to the last (least squares would hide nothing more here)."""
    a, b = rows[0], rows[-1]
    k = max(b["requests"] - a["requests"], 1) / 1000
    return {key: round((b[key] - a[key]) / k / (1024 if key.endswith("_kib") else 1), 3)
            for key in b if key != "requests" and isinstance(b.get(key), int) and key in a}


def _type_growth(s0: dict, s1: dict, top: int = 12) -> dict:
    d = {t: s1["by_type"].get(t, 0) - s0["by_type"].get(t, 0) for t in set(s0["by_type"]) | set(s1["by_type"])}
    return dict(sorted(((t, v) for t, v in d.items() if v), key=lambda kv: -abs(kv[1]))[:top])


def _traced_growth(path0: str, path1: str, top: int = 15) -> list[str]:
    import tracemalloc

    a, b = tracemalloc.Snapshot.load(path0), tracemalloc.Snapshot.load(path1)
    out = []
    for stat in b.compare_to(a, "traceback")[:top]:
        frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in list(stat.traceback)[:6])
        out.append(f"{stat.size_diff / 1024:+.1f} KiB {stat.count_diff:+d} blocks: {frames}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--round-seconds", type=float, default=40.0)
    ap.add_argument("--warmup-seconds", type=float, default=60.0)
    ap.add_argument("--trace-from", type=int, default=None, help="start tracemalloc after this round's snapshot")
    ap.add_argument("--trace-frames", type=int, default=10)
    ap.add_argument("--heaptrack-from", type=int, default=None,
                    help="attach heaptrack to the server after this round's snapshot (native allocations with "
                         "backtraces; its file is named in the report)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-env", action="append", default=[], metavar="K=V",
                    help="environment of the server process (e.g. MALLOC_MMAP_THRESHOLD_=...), repeatable")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llmctl-memrounds-"))
    from tests.model_factory import load_test_tokenizer, make_tiny_model

    model = make_tiny_model("llama", tmp / "llama", load_test_tokenizer(tmp))
    probe = tmp / "mem.jsonl"
    env = dict(kv.split("=", 1) for kv in a.server_env)
    srv = spawn_server(model, tmp, "--stream-write-timeout", "2", "--kv-cache-memory", str(24 << 20),
                       "--long-prefill-token-threshold", str(LONG_PREFILL_TOKEN_THRESHOLD), "--max-num-batched-tokens",
                       str(MAX_NUM_BATCHED_TOKENS), "--mem-probe", str(probe), env=env, timeout=600)
    rows, snaps, report = [], [], {}
    heaptrack = None
    try:
        asyncio.run(_fill_kv(srv.url))
        asyncio.run(_run(srv.url, a.warmup_seconds, a.seed + 1))
        for r in range(a.rounds + 1):
            if r:
                asyncio.run(_run(srv.url, a.round_seconds, a.seed + 1 + r))
            m = wait_idle_metrics(srv, timeout=600)
            time.sleep(1.5)  # the engine trims malloc after 0.5 s idle
            trace = a.trace_from is not None and r == a.trace_from
            snap = _snapshot(probe, f"snap trace {a.trace_frames}" if trace else "snap")
            snaps.append(snap)
            rows.append(_row(snap, _finished(m)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if a.heaptrack_from is not None and r == a.heaptrack_from:
                import subprocess

                heaptrack = subprocess.Popen(["heaptrack", "-o", str(tmp / "heaptrack"), "-p", str(srv.proc.pid)])
                time.sleep(10)
                report["heaptrack"] = str(tmp / "heaptrack")
        report["rows"] = rows
        untraced = [row for row in rows if "traced_kib" not in row][1:]
        if len(untraced) >= 2:
            report["per_1000_untraced"] = _slopes(untraced)
        report["gc_type_growth_first_to_last"] = _type_growth(snaps[1], snaps[-1])
        tms = [s["tracemalloc"] for s in snaps if "tracemalloc" in s]
        if len(tms) >= 2:
            report["traced_growth_last_two"] = _traced_growth(tms[-2], tms[-1])
            report["traced_growth_first_last"] = _traced_growth(tms[0], tms[-1])
    finally:
        stop_server(srv)
        if heaptrack is not None:
            heaptrack.wait(120)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
