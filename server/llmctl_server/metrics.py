"""Prometheus metrics, one registry per app (two apps in one process, as in tests, do not collide).

Counters and histograms are updated by the request handlers; engine-state gauges (running/waiting requests,
KV-cache usage, prefix-cache hit rate) are read from ``engine.get_stats()`` at scrape time by a collector, so
they are never stale and cost nothing between scrapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger("llmctl_server")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            s = self._stats() or {}
        except Exception as exc:  # a dead engine must not break the scrape of the other metrics
            logger.debug("get_stats failed during scrape: %s", exc)
            s = {}
        running = GaugeMetricFamily("llmctl_num_requests_running", "Requests the engine is running")
        running.add_metric([], float(s.get("num_running", 0)))
        yield running
        waiting = GaugeMetricFamily("llmctl_num_requests_waiting", "Requests waiting in the engine's queue")
        waiting.add_metric([], float(s.get("num_waiting", 0)))
        yield waiting
        total, free = s.get("kv_blocks_total") or 0, s.get("kv_blocks_free") or 0
        usage = GaugeMetricFamily("llmctl_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1)")
        usage.add_metric([], (1.0 - free / total) if total else 0.0)
        yield usage
        queried = s.get("prefix_cache_queried_tokens") or 0
        hit = GaugeMetricFamily("llmctl_prefix_cache_hit_rate", "Prefix-cache hit tokens / queried tokens (0..1)")
        hit.add_metric([], (s.get("prefix_cache_hit_tokens", 0) / queried) if queried else 0.0)
        yield hit
        yield from _spec_decode_metrics(s)


def _spec_decode_metrics(s: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    """Only when the engine speculates (its stats then carry the spec_* keys)."""
    if "spec_num_draft_tokens" not in s:
        return
    for key, name, doc in (
            ("spec_num_draft_tokens", "llmctl_spec_decode_num_draft_tokens", "Draft tokens proposed"),
            ("spec_num_accepted_tokens", "llmctl_spec_decode_num_accepted_tokens", "Draft tokens accepted"),
            ("spec_acceptance_rate", "llmctl_spec_decode_acceptance_rate", "Accepted / proposed draft tokens"),
            ("spec_mean_tokens_per_step", "llmctl_spec_decode_tokens_per_step",
             "Tokens a request gains per verified step (accepted drafts + 1)")):
        g = GaugeMetricFamily(name, doc)
        g.add_metric([], float(s.get(key) or 0.0))
        yield g


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmctl_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("llmctl_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("llmctl_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("llmctl_requests_finished", "Generation requests by finish reason", ["reason"],
                                registry=r)
        self.ttft = Histogram("llmctl_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("llmctl_inter_token_latency_seconds", "Time between output chunks per token",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("llmctl_e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
