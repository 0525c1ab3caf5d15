"""Metrics naming schemes (llmctl and vLLM's), the engine-side counters behind them, the Grafana dashboard against
the exported names, and OpenTelemetry request tracing with an in-memory exporter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from llmctl import AsyncLLM, EngineArgs
from llmctl_server import ServerSettings, build_app
from llmctl_server.metrics import exported_metric_names, metric_names

from tests.test_server_support import start_server

KV = 64 << 20
REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "llmctl.json"
KEY = "sk-observe"

# Every metric family a vLLM dashboard commonly queries (vLLM's own names, counters without ``_total``).
VLLM_NAMES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds", "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_preemptions",
    "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
    "vllm:iteration_tokens_total", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:request_success",
]


def parse(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def value(samples: dict[str, float], name: str, missing: float | None = None, **labels: str) -> float:
    total, seen = 0.0, False
    for key, v in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{lv}"' in rest for k, lv in labels.items()):
            total, seen = total + v, True
    if not seen and missing is not None:
        return missing  # a labelled series appears on its first use
    assert seen, f"{name} {labels} not exported"
    return total


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    eng = AsyncLLM.from_engine_args(EngineArgs(model=str(tiny_llama_dir), kv_cache_memory=KV, seed=0,
                                               max_num_batched_tokens=256))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def vllm_server(engine):
    srv = start_server(engine, ServerSettings(served_model_names=["tiny"], api_key=KEY, metrics_prefix="vllm"))
    yield srv
    srv.stop()


def _chat(url: str, content: str, max_tokens: int = 6, key: str | None = KEY, **headers: str) -> dict:
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers)
    r = httpx.post(url + "/v1/chat/completions", headers=h, timeout=60,
                   json={"model": "tiny", "messages": [{"role": "user", "content": content}],
                         "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def _scrape(url: str, key: str | None = KEY) -> dict[str, float]:
    r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10)
    assert r.status_code == 200, r.text
    return parse(r.text)


def test_vllm_names_with_model_label_and_moving_counters(vllm_server):
    before = _scrape(vllm_server.url)
    prompt = "A shared prefix long enough to fill a few KV blocks of the cache, " * 4
    usage = [_chat(vllm_server.url, prompt + str(i))["usage"] for i in range(2)]
    after = _scrape(vllm_server.url)
    families = {re.sub(r"(_total|_bucket|_count|_sum|_created)$", "", k.partition("{")[0]) for k in after}
    for name in VLLM_NAMES:
        assert name in families or name.removesuffix("_total") in families, name
        assert any(k.partition("{")[0].startswith(name) and 'model_name="tiny"' in k for k in after), name
    assert not any(k.startswith("llmctl_") and "http_requests" not in k for k in after)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, model_name="tiny", **labels) - value(before, name, 0.0, model_name="tiny", **labels)

    assert delta("vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in usage)
    assert delta("vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert delta("vllm:request_success_total", finished_reason="length") == 2
    for hist in ("vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                 "vllm:request_decode_time_seconds", "vllm:time_to_first_token_seconds",
                 "vllm:e2e_request_latency_seconds"):
        assert delta(hist + "_count") == 2, hist
    # Each request ran 1 prefill step plus 5 decode steps (the engine was otherwise idle).
    assert delta("vllm:iteration_tokens_total_count") >= 2 * 6
    assert delta("vllm:iteration_tokens_total_sum") >= sum(u["prompt_tokens"] + 5 for u in usage) - \
        delta("vllm:prefix_cache_hits_total")
    # The second prompt shares whole blocks with the first: the prefix cache was queried and hit.
    assert delta("vllm:prefix_cache_queries_total") >= sum(u["prompt_tokens"] for u in usage) - 2 * 16
    assert delta("vllm:prefix_cache_hits_total") > 0
    assert value(after, "vllm:prefix_cache_hits_total") == value(after, "vllm:gpu_prefix_cache_hits_total")
    assert value(after, "vllm:num_preemptions_total", model_name="tiny") >= 0
    assert value(after, "vllm:kv_cache_usage_perc") == value(after, "vllm:gpu_cache_usage_perc")


def test_request_times_add_up(vllm_server):
    """Queue + prefill + decode time of a request never exceed its end-to-end latency."""
    before = _scrape(vllm_server.url)
    _chat(vllm_server.url, "timing", max_tokens=8)
    after = _scrape(vllm_server.url)

    def d(name: str) -> float:
        return value(after, name) - value(before, name, 0.0)

    parts = sum(d(f"vllm:request_{p}_time_seconds_sum") for p in ("queue", "prefill", "decode"))
    assert 0 < parts <= d("vllm:e2e_request_latency_seconds_sum")
    assert d("vllm:request_decode_time_seconds_sum") > 0


def test_llmctl_scheme_default(engine):
    srv = start_server(engine, ServerSettings(served_model_names=["tiny"]))
    try:
        _chat(srv.url, "hello", key=None)
        text = httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()
    samples = parse(text)
    for name in ("llmctl_num_preemptions_total", "llmctl_prefix_cache_queries_total", "llmctl_prefix_cache_hits_total",
                 "llmctl_request_queue_time_seconds_count", "llmctl_request_prefill_time_seconds_count",
                 "llmctl_request_decode_time_seconds_count", "llmctl_iteration_tokens_count",
                 "llmctl_num_requests_running", "llmctl_kv_cache_usage_ratio"):
        assert value(samples, name, model_name="tiny") >= 0, name
    assert value(samples, "llmctl_requests_finished_total", reason="length") >= 1
    assert not any(k.startswith("vllm:") for k in samples)


def test_bad_metrics_prefix_is_a_clear_error():
    with pytest.raises(ValueError, match="metrics_prefix"):
        ServerSettings(metrics_prefix="prom")
    with pytest.raises(ValueError, match="metrics_prefix"):
        metric_names("other", "ttft")


# -- Grafana dashboard -------------------------------------------------------------------------------------------------
def _dashboard_metric_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v.get("query", {}).get("query", "") if isinstance(v.get("query"), dict) else v.get("query", "")
              for v in dash.get("templating", {}).get("list", [])]
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"vllm:[A-Za-z0-9_:]+", expr))
    return names


def test_grafana_dashboard_queries_only_exported_metrics():
    used = _dashboard_metric_names()
    exported = exported_metric_names("vllm")
    suffixes = ("_total", "_bucket", "_count", "_sum")
    series = exported | {n + s for n in exported for s in suffixes}
    missing = sorted(n for n in used if n not in series)
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"
    panels = " ".join(p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"])
    for topic in ("time to first token", "inter-token", "throughput", "kv cache", "prefix", "queue", "preemption"):
        assert topic in panels, topic


def test_grafana_dashboard_metrics_appear_on_a_live_scrape(vllm_server):
    _chat(vllm_server.url, "dashboard")
    families = {k.partition("{")[0] for k in _scrape(vllm_server.url)}
    for name in _dashboard_metric_names():
        assert name in families or any(f.startswith(name + "_") for f in families), name


# -- tracing ---------------------------------------------------------------------------------------------------------
def test_tracing_off_by_default(engine):
    app = build_app(engine, ServerSettings())
    assert app.state.llmctl.tracer is None


def test_request_span_with_parent_context(engine):
    from llmctl_server.tracing import SPAN_NAME, RequestTracer
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    srv = start_server(engine, ServerSettings(served_model_names=["tiny"]))
    srv.app.state.llmctl.tracer = RequestTracer.with_processor(SimpleSpanProcessor(exporter))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        body = _chat(srv.url, "trace me", max_tokens=5, key=None,
                     traceparent=f"00-{trace_id}-00f067aa0ba902b7-01")
    finally:
        srv.stop()
    spans = exporter.get_finished_spans()
    assert len(spans) == 1
    span = spans[0]
    assert span.name == SPAN_NAME
    assert format(span.context.trace_id, "032x") == trace_id
    assert format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    a = span.attributes
    assert a["gen_ai.request.id"] == body["id"]
    assert a["gen_ai.response.model"] == "tiny"
    assert a["gen_ai.usage.completion_tokens"] == body["usage"]["completion_tokens"] == 5
    assert a["gen_ai.usage.prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert a["gen_ai.request.max_tokens"] == 5 and a["gen_ai.request.temperature"] == 0
    assert 0 <= a["gen_ai.latency.time_in_queue"] <= a["gen_ai.latency.e2e"]
    assert 0 < a["gen_ai.latency.time_to_first_token"] <= a["gen_ai.latency.e2e"]
    assert a["gen_ai.latency.time_in_model_decode"] > 0
    assert span.end_time - span.start_time == pytest.approx(a["gen_ai.latency.e2e"] * 1e9, rel=0.05, abs=2e6)


def test_otlp_endpoint_setting(engine):
    from llmctl_server.tracing import check_tracing_available

    app = build_app(engine, ServerSettings(otlp_traces_endpoint="http://127.0.0.1:4318/v1/traces"))
    tracer = app.state.llmctl.tracer
    assert tracer is not None
    exporter = tracer.provider._active_span_processor._span_processors[0]._batch_processor._exporter
    assert exporter._endpoint == "http://127.0.0.1:4318/v1/traces"
    tracer.shutdown()  # nothing was traced, so nothing is sent
    with pytest.raises(ValueError, match="otlp_traces_endpoint"):
        check_tracing_available("collector:4317")


def test_data_parallel_engine_series_are_labelled_by_engine():
    """With replicas (data parallelism) each engine-state series has one sample per replica, labelled ``engine``
    as vLLM's are; a single engine's keep ``model_name`` only."""
    from llmctl_server.metrics import Metrics
    from prometheus_client import generate_latest

    def replica(running: int, free: int) -> dict:
        return {"num_running": running, "num_waiting": 0, "kv_blocks_total": 10, "kv_blocks_free": free,
                "prefix_cache_queried_tokens": 32, "prefix_cache_hit_tokens": 16, "num_preemptions": 0,
                "iteration_tokens_buckets": ((1.0, 2), (float("inf"), 3)), "iteration_tokens_sum": 9}

    stats = {**replica(3, 6), "replicas": [replica(1, 8), replica(2, 8)]}
    text = generate_latest(Metrics(lambda: stats, "tiny", "vllm").registry).decode()
    assert 'vllm:num_requests_running{engine="0",model_name="tiny"} 1.0' in text
    assert 'vllm:num_requests_running{engine="1",model_name="tiny"} 2.0' in text
    assert re.search(r'vllm:kv_cache_usage_perc\{engine="1",model_name="tiny"\} 0\.(2|1999)', text)
    assert 'vllm:iteration_tokens_total_count{engine="0",model_name="tiny"} 3.0' in text
    single = generate_latest(Metrics(lambda: replica(1, 8), "tiny", "vllm").registry).decode()
    assert 'vllm:num_requests_running{model_name="tiny"} 1.0' in single and "engine=" not in single
