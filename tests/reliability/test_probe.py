"""The soak's canary gaps and their attribution (benchmarks/soak/hostile_mix.py, tests/reliability/_probe.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.reliability._probe import attribute

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "soak"))
from hostile_mix import _gaps  # noqa: E402


def test_gaps_are_between_lines_of_one_stream():
    stamps = [(0.0, "a"), (0.01, "a"), (0.05, "a"), (0.5, "b"), (0.52, "b")]
    assert [round(g, 3) for g in _gaps(stamps)] == [0.01, 0.04, 0.02]  # 0.05 -> 0.5 is a new stream, not a gap


def test_each_slow_gap_is_attributed_to_what_overlapped_it(tmp_path):
    records = [
        ["step", 1.00, 0.15, None], ["gc", 1.05, 0.05, [2, 0]],  # gap 1: a full collection inside a step
        ["sched", 2.00, 0.0, [40, 0, 0]], ["step", 2.00, 0.14, None],  # gap 2: a step with 40 sequences
        ["preempt", 3.00, 0.0, "cmpl-c"],  # gap 3: the canary's own request preempted
        ["sched", 4.00, 0.0, [5, 60, 3]], ["step", 4.00, 0.12, None],  # gap 4: a step with a prompt chunk
    ]
    server = tmp_path / "server.jsonl"
    server.write_text("".join(json.dumps(r) + "\n" for r in records))
    host = tmp_path / "host.jsonl"
    host.write_text(json.dumps(["host", 5.02, 0.09, None]) + "\n")  # gap 5: the host did not run us
    stamps = [(0.98, "cmpl-a"), (1.16, "cmpl-a"), (1.99, "cmpl-b"), (2.15, "cmpl-b"), (2.99, "cmpl-c"),
              (3.30, "cmpl-c"), (3.99, "cmpl-d"), (4.13, "cmpl-d"), (5.00, "cmpl-e"), (5.12, "cmpl-e"),
              (6.00, "cmpl-f"), (6.11, "cmpl-f"), (6.13, "cmpl-f")]  # gap 6: nothing logged
    report = attribute(server, host, stamps, over_s=0.1)
    assert report["gaps"] == 7 and report["gaps_over_100ms"] == 6
    assert report["causes"] == {"gc pause > 10 ms": 1, "step with >= 30 sequences": 1, "canary preempted": 1,
                                "step with prompt tokens": 1, "host oversleep > 10 ms": 1, "other": 1}
    assert report["gc"]["gen2"]["max_ms"] == 50.0 and report["preemptions"] == 1
