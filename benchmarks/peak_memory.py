#!/usr/bin/env python
"""Peak memory of a command's whole process tree, sampled from /proc while it runs.

Why: an engine that runs its model in a child process (vLLM's V1 engine core) reports only its front end's
``ru_maxrss`` from inside, which leaves out the weights and the KV cache. This samples every descendant's RSS and
PSS (``smaps_rollup``; shared library pages split between the processes that map them) every ``--interval``
seconds and reports the largest sums, plus the largest single process.

    .venv/bin/python benchmarks/peak_memory.py -- "$VLLM_VENV/bin/python" "$LLMCTL_PEERS_DIR/vllm_bench.py" \
        --model "$SMOLLM2_HF" --dtype bfloat16

Prints the command's own output, then one JSON line (``peak_memory``: MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out.extend(int(c) for c in text)
    except OSError:
        pass
    return out


def process_tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(_children(pid))
    return pids


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def sample(root: int) -> tuple[int, int, int]:
    """(sum of RSS, sum of PSS, largest RSS) over the tree, in KiB."""
    rss = [(_kib(f"/proc/{p}/status", "VmRSS:"), _kib(f"/proc/{p}/smaps_rollup", "Pss:")) for p in process_tree(root)]
    return sum(r for r, _ in rss), sum(p for _, p in rss), max((r for r, _ in rss), default=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("command: give the command to run after --")
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    peak = [0, 0, 0]
    procs = 0
    while proc.poll() is None:
        s = sample(proc.pid)
        peak = [max(x, y) for x, y in zip(peak, s)]
        procs = max(procs, len(process_tree(proc.pid)))
        time.sleep(a.interval)
    print(json.dumps({"peak_memory": {"tree_rss_mib": peak[0] // 1024, "tree_pss_mib": peak[1] // 1024,
                                      "largest_process_rss_mib": peak[2] // 1024, "processes": procs},
                      "returncode": proc.returncode}), flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
