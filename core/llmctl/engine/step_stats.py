"""Cumulative per-step counts the engine reports through ``get_stats()`` for monitoring.

The engine only counts; turning the counts into Prometheus series is the server's job, so the core carries no
metrics library. Counts are cumulative since start (Prometheus computes rates from them) and the snapshot holds
only immutable values, because ``AsyncLLM`` hands a shallow copy of it to other threads.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# vLLM's bucket bounds for ``vllm:iteration_tokens_total`` (tokens scheduled in one engine step).
ITERATION_TOKEN_BUCKETS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class IterationTokenStats:
    """A histogram of the number of tokens each engine step ran (prefill chunks and decodes together)."""

    bounds: tuple[int, ...] = ITERATION_TOKEN_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative); the last one is +Inf
    total_tokens: int = 0
    num_steps: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, num_tokens: int) -> None:
        self.counts[bisect.bisect_left(self.bounds, num_tokens)] += 1
        self.total_tokens += num_tokens
        self.num_steps += 1

    def snapshot(self) -> dict[str, object]:
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            cumulative.append((float(bound), running))
        return {"iteration_tokens_buckets": tuple(cumulative), "iteration_tokens_sum": self.total_tokens,
                "iteration_tokens_count": self.num_steps}
