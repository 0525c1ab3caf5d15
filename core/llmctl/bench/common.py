"""Helpers shared by the benchmarks: seeded random prompts, percentiles, peak RSS."""

from __future__ import annotations

import json
import math
import platform
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


def random_token_prompts(n: int, input_len: int, vocab_size: int, seed: int = 0, low: int = 100) -> list[list[int]]:
    """``n`` prompts of exactly ``input_len`` random token ids in ``[low, vocab_size)``, reproducible from ``seed``.

    Same generator as the shared peer workload (``random.Random(seed)``, one ``randrange`` per id, prompt by
    prompt), so every engine measured on it sees identical prompts. ``low`` skips the special tokens that most
    vocabularies put first."""
    if n < 1 or input_len < 1:
        raise ValueError(f"num_prompts and input_len must be >= 1, got {n} and {input_len}")
    low = min(low, max(0, vocab_size - 1))
    rng = random.Random(seed)
    return [[rng.randrange(low, vocab_size) for _ in range(input_len)] for _ in range(n)]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); NaN for an empty sequence."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def percentiles(values: Sequence[float], qs: Sequence[float] = DEFAULT_PERCENTILES, scale: float = 1.0
                ) -> dict[str, float]:
    """``{"mean", "p50", "p90", "p99", ...}`` of ``values`` times ``scale`` (e.g. 1000 for seconds -> ms)."""
    out = {"mean": (sum(values) / len(values) * scale) if values else math.nan}
    for q in qs:
        out[f"p{q:g}"] = percentile(values, q) * scale
    return out


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MiB (None where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, KiB on Linux


def rounded(obj: Any, ndigits: int = 3) -> Any:
    """Round the floats inside nested dicts/lists, for printing and JSON."""
    if isinstance(obj, float):
        return obj if math.isnan(obj) or math.isinf(obj) else round(obj, ndigits)
    if isinstance(obj, dict):
        return {k: rounded(v, ndigits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, ndigits) for v in obj]
    return obj


def cpu_model() -> str:
    """The host CPU's model name, recorded next to every figure (figures mean little without it)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report_ratios_and_record(record: dict[str, Any], out: Path | None) -> None:
    """The tail the parallelism benchmarks share: each ratio, the load averages around the run, the record as one
    JSON line, and the record written to ``out`` when given."""
    for k, v in record["ratios"].items():
        print(f"{k}: {v:.3f}")
    host = record["host"]
    print(f"load average before {host['loadavg_before']}, after {host['loadavg_after']}")
    print(json.dumps(record))
    if out:
        out.write_text(json.dumps(record, indent=1) + "\n")
