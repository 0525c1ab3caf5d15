"""Prometheus metrics, one registry per app (two apps in one process, as in tests, do not collide).

Counters and histograms are updated by the request handlers; engine-state series (running/waiting requests,
KV-cache usage, prefix-cache queries and hits, preemptions, tokens per step) are read from
``engine.get_stats()`` at scrape time by a collector, so they are never stale and cost nothing between scrapes.

Two naming schemes (``--metrics-prefix``): ``llmctl`` (the default: ``llmctl_*`` names) and ``vllm``, which
exports vLLM's names (``vllm:*``, with vLLM's label names) so that dashboards and alerts written for vLLM work
unchanged. Where vLLM renamed a metric between releases, the ``vllm`` scheme exports both names (the list in
``_NAMES``). Every series carries a ``model_name`` label (the first served model name), as vLLM's do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger("llmctl_server")

METRIC_SCHEMES = ("llmctl", "vllm")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

# key -> (llmctl name, vLLM names). Counter names are given without the ``_total`` the exposition adds.
_NAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "num_requests_running": ("llmctl_num_requests_running", ("vllm:num_requests_running",)),
    "num_requests_waiting": ("llmctl_num_requests_waiting", ("vllm:num_requests_waiting",)),
    "kv_cache_usage": ("llmctl_kv_cache_usage_ratio", ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
    "prefix_cache_hit_rate": ("llmctl_prefix_cache_hit_rate", ("vllm:gpu_prefix_cache_hit_rate",)),
    "prefix_cache_queries": ("llmctl_prefix_cache_queries",
                             ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries")),
    "prefix_cache_hits": ("llmctl_prefix_cache_hits", ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits")),
    "num_preemptions": ("llmctl_num_preemptions", ("vllm:num_preemptions",)),
    "iteration_tokens": ("llmctl_iteration_tokens", ("vllm:iteration_tokens_total",)),
    "http_requests": ("llmctl_http_requests", ("vllm:http_requests",)),
    "prompt_tokens": ("llmctl_prompt_tokens", ("vllm:prompt_tokens",)),
    "generation_tokens": ("llmctl_generation_tokens", ("vllm:generation_tokens",)),
    "requests_finished": ("llmctl_requests_finished", ("vllm:request_success",)),
    "ttft": ("llmctl_time_to_first_token_seconds", ("vllm:time_to_first_token_seconds",)),
    "itl": ("llmctl_inter_token_latency_seconds",
            ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")),
    "e2e": ("llmctl_e2e_request_latency_seconds", ("vllm:e2e_request_latency_seconds",)),
    "queue_time": ("llmctl_request_queue_time_seconds", ("vllm:request_queue_time_seconds",)),
    "prefill_time": ("llmctl_request_prefill_time_seconds", ("vllm:request_prefill_time_seconds",)),
    "decode_time": ("llmctl_request_decode_time_seconds", ("vllm:request_decode_time_seconds",)),
    "inference_time": ("llmctl_request_inference_time_seconds", ("vllm:request_inference_time_seconds",)),
    "request_prompt_tokens": ("llmctl_request_prompt_tokens", ("vllm:request_prompt_tokens",)),
    "request_generation_tokens": ("llmctl_request_generation_tokens", ("vllm:request_generation_tokens",)),
    "mm_cache_queries": ("llmctl_mm_encoder_cache_queries", ("vllm:mm_cache_queries",)),
    "mm_cache_hits": ("llmctl_mm_encoder_cache_hits", ("vllm:mm_cache_hits",)),
    "spec_num_draft_tokens": ("llmctl_spec_decode_num_draft_tokens", ("vllm:spec_decode_num_draft_tokens",)),
    "spec_num_accepted_tokens": ("llmctl_spec_decode_num_accepted_tokens",
                                 ("vllm:spec_decode_num_accepted_tokens",)),
    "spec_acceptance_rate": ("llmctl_spec_decode_acceptance_rate", ("vllm:spec_decode_draft_acceptance_rate",)),
    "spec_mean_tokens_per_step": ("llmctl_spec_decode_tokens_per_step", ("vllm:spec_decode_mean_tokens_per_step",)),
}
# vLLM calls the finish-reason label ``finished_reason``.
_REASON_LABEL = {"llmctl": "reason", "vllm": "finished_reason"}


def metric_names(scheme: str, key: str) -> tuple[str, ...]:
    """The names ``key`` is exported under in ``scheme`` (several where vLLM renamed it)."""
    if scheme not in METRIC_SCHEMES:
        raise ValueError(f"metrics_prefix: expected one of {', '.join(METRIC_SCHEMES)}, got {scheme!r}")
    own, vllm = _NAMES[key]
    return (own,) if scheme == "llmctl" else vllm


def exported_metric_names(scheme: str) -> set[str]:
    """Every metric family name the server exports in ``scheme`` (without the ``_total``/``_bucket`` suffixes)."""
    return {name for key in _NAMES for name in metric_names(scheme, key)}


class _Fanout:
    """One logical metric exported under several names: every update goes to each of them."""

    def __init__(self, children: Sequence[Any]) -> None:
        self._children = list(children)

    def observe(self, value: float) -> None:
        for c in self._children:
            c.observe(value)

    def inc(self, amount: float = 1.0) -> None:
        for c in self._children:
            c.inc(amount)

    def labels(self, **labels: str) -> _Fanout:
        return _Fanout([c.labels(**labels) for c in self._children])


@dataclass(frozen=True)
class _Naming:
    scheme: str
    model_name: str

    def names(self, key: str) -> tuple[str, ...]:
        return metric_names(self.scheme, key)


class _EngineCollector(Collector):
    """Engine-state series read from ``get_stats()`` at scrape time. With data parallelism (``replicas`` in the
    stats) every series has one sample per replica, labelled ``engine`` as vLLM labels them; a single engine's
    series keep only ``model_name``."""

    def __init__(self, stats: Callable[[], dict[str, Any]], naming: _Naming) -> None:
        self._stats = stats
        self._naming = naming

    def _samples(self, family: type, key: str, doc: str, per: list[tuple[list[str], float]],
                 labels: list[str]) -> Iterator[Metric]:
        for name in self._naming.names(key):
            m = family(name, doc, labels=labels)
            for values, value in per:
                m.add_metric(values, value)
            yield m

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats() or {}
        except Exception as exc:  # a dead engine must not break the scrape of the other metrics
            logger.debug("get_stats failed during scrape: %s", exc)
            stats = {}
        model = self._naming.model_name
        replicas = stats.get("replicas")
        if replicas:
            engines = [([model, str(i)], r) for i, r in enumerate(replicas)]
            labels = ["model_name", "engine"]
        else:
            engines, labels = [([model], stats)], ["model_name"]

        def each(fn: Callable[[dict[str, Any]], float]) -> list[tuple[list[str], float]]:
            return [(values, float(fn(s))) for values, s in engines]

        def gauge(key: str, doc: str, fn: Callable[[dict[str, Any]], float]) -> Iterator[Metric]:
            return self._samples(GaugeMetricFamily, key, doc, each(fn), labels)

        def counter(key: str, doc: str, fn: Callable[[dict[str, Any]], float]) -> Iterator[Metric]:
            return self._samples(CounterMetricFamily, key, doc, each(fn), labels)

        def usage(s: dict[str, Any]) -> float:
            total, free = s.get("kv_blocks_total") or 0, s.get("kv_blocks_free") or 0
            return (1.0 - free / total) if total else 0.0

        def hit_rate(s: dict[str, Any]) -> float:
            queried = s.get("prefix_cache_queried_tokens") or 0
            return (s.get("prefix_cache_hit_tokens") or 0) / queried if queried else 0.0

        yield from gauge("num_requests_running", "Requests the engine is running", lambda s: s.get("num_running", 0))
        yield from gauge("num_requests_waiting", "Requests waiting in the engine's queue",
                         lambda s: s.get("num_waiting", 0))
        yield from gauge("kv_cache_usage", "Fraction of KV-cache blocks in use (0..1)", usage)
        yield from gauge("prefix_cache_hit_rate", "Prefix-cache hit tokens / queried tokens (0..1)", hit_rate)
        yield from counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                           lambda s: s.get("prefix_cache_queried_tokens") or 0)
        yield from counter("prefix_cache_hits", "Prompt tokens found in the prefix cache",
                           lambda s: s.get("prefix_cache_hit_tokens") or 0)
        yield from counter("num_preemptions", "Requests preempted (KV blocks ran out) and recomputed later",
                           lambda s: s.get("num_preemptions", 0))
        if all(s.get("iteration_tokens_buckets") for _, s in engines):
            for name in self._naming.names("iteration_tokens"):
                h = HistogramMetricFamily(name, "Tokens scheduled per engine step", labels=labels)
                for values, s in engines:
                    le = [("+Inf" if bound == float("inf") else _le(bound), float(n))
                          for bound, n in s["iteration_tokens_buckets"]]
                    h.add_metric(values, le, float(s.get("iteration_tokens_sum", 0)))
                yield h
        if all("mm_encoder_cache_queries" in s for _, s in engines):  # only for a model that takes images
            yield from counter("mm_cache_queries", "Image encoder outputs looked up by content hash",
                               lambda s: s["mm_encoder_cache_queries"])
            yield from counter("mm_cache_hits", "Image encoder outputs found (the vision tower did not run)",
                               lambda s: s.get("mm_encoder_cache_hits", 0))
        if all("spec_num_draft_tokens" in s for _, s in engines):  # only when the engine speculates
            for key, doc in (("spec_num_draft_tokens", "Draft tokens proposed"),
                             ("spec_num_accepted_tokens", "Draft tokens accepted"),
                             ("spec_acceptance_rate", "Accepted / proposed draft tokens"),
                             ("spec_mean_tokens_per_step", "Tokens a request gains per verified step (accepted + 1)")):
                yield from gauge(key, doc, lambda s, k=key: s.get(k) or 0.0)


def _le(bound: float) -> str:
    return str(float(bound))


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str = "model", scheme: str = "llmctl") -> None:
        naming = _Naming(scheme, model_name)
        self.scheme = scheme
        self.registry = CollectorRegistry()
        reason_label = _REASON_LABEL[scheme]

        def make(cls: type, key: str, doc: str, extra: Sequence[str] = (), **kw: Any) -> _Fanout:
            metrics = [cls(name, doc, ["model_name", *extra], registry=self.registry, **kw)
                       for name in naming.names(key)]
            if extra:
                return _Fanout(metrics)
            return _Fanout([m.labels(model_name=model_name) for m in metrics])

        fixed = {"model_name": model_name}
        self.requests = _Labelled(make(Counter, "http_requests", "HTTP requests by route and status",
                                       ["route", "status"]), fixed)
        self.prompt_tokens = make(Counter, "prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = make(Counter, "generation_tokens", "Tokens generated")
        # ``.labels(reason=...)`` in both schemes; exported under vLLM's label name ``finished_reason`` there.
        self.finished = _Labelled(make(Counter, "requests_finished", "Generation requests by finish reason",
                                       [reason_label]), fixed, {"reason": reason_label})
        self.ttft = make(Histogram, "ttft", "Time to first token", buckets=_LATENCY_BUCKETS)
        self.itl = make(Histogram, "itl", "Time between output chunks per token", buckets=_ITL_BUCKETS)
        self.e2e = make(Histogram, "e2e", "Request latency, arrival to last token", buckets=_LATENCY_BUCKETS)
        self.queue_time = make(Histogram, "queue_time", "Time a request waited before its first step",
                               buckets=_LATENCY_BUCKETS)
        self.prefill_time = make(Histogram, "prefill_time", "First step to first token", buckets=_LATENCY_BUCKETS)
        self.decode_time = make(Histogram, "decode_time", "First token to last token", buckets=_LATENCY_BUCKETS)
        self.inference_time = make(Histogram, "inference_time", "First step to last token",
                                   buckets=_LATENCY_BUCKETS)
        self.request_prompt_tokens = make(Histogram, "request_prompt_tokens", "Prompt tokens per request",
                                          buckets=_TOKEN_BUCKETS)
        self.request_generation_tokens = make(Histogram, "request_generation_tokens", "Generated tokens per request",
                                              buckets=_TOKEN_BUCKETS)
        self.registry.register(_EngineCollector(stats, naming))

    def observe_request_times(self, metrics: Any) -> None:
        """Queue, prefill, decode and inference time of one engine request, from its ``RequestMetrics``
        (wall-clock stamps taken by the engine; missing stamps, e.g. a request aborted in the queue, skip)."""
        if metrics is None:
            return
        arrival = getattr(metrics, "arrival_time", None)
        scheduled = getattr(metrics, "first_scheduled_time", None)
        first = getattr(metrics, "first_token_time", None)
        last = getattr(metrics, "last_token_time", None)
        if arrival is not None and scheduled is not None:
            self.queue_time.observe(max(0.0, scheduled - arrival))
        if scheduled is not None and first is not None:
            self.prefill_time.observe(max(0.0, first - scheduled))
        if first is not None and last is not None:
            self.decode_time.observe(max(0.0, last - first))
        if scheduled is not None and last is not None:
            self.inference_time.observe(max(0.0, last - scheduled))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Labelled:
    """A labelled metric with the ``model_name`` label filled in (and label names mapped to the scheme's)."""

    def __init__(self, metric: _Fanout, fixed: dict[str, str], rename: dict[str, str] | None = None) -> None:
        self._metric = metric
        self._fixed = fixed
        self._rename = rename or {}

    def labels(self, **labels: str) -> _Fanout:
        return self._metric.labels(**self._fixed, **{self._rename.get(k, k): v for k, v in labels.items()})
