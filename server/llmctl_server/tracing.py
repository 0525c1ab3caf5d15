"""Optional OpenTelemetry tracing of generation requests (``--otlp-traces-endpoint``; off by default).

One span per finished request, named and attributed as vLLM's (``llm_request`` with ``gen_ai.*`` attributes),
so the same trace views work. A W3C ``traceparent`` header on the request makes the span a child of the
caller's trace. The span is written once the request is done, from timestamps already taken for the metrics,
so tracing adds nothing to the token path. The OpenTelemetry SDK is imported only when tracing is on.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

SPAN_NAME = "llm_request"


def check_tracing_available(endpoint: str) -> None:
    """ValueError naming the option when ``endpoint`` is not a URL or the OpenTelemetry packages are missing."""
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"otlp_traces_endpoint: expected an http:// or https:// URL, got {endpoint!r}")
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise ValueError("otlp_traces_endpoint: tracing needs the OpenTelemetry SDK and OTLP exporter; install them "
                         "with: pip install 'llmctl-server[tracing]'") from None


class RequestTracer:
    def __init__(self, tracer: Any, provider: Any = None) -> None:
        self._tracer = tracer
        self.provider = provider

    @classmethod
    def to_endpoint(cls, endpoint: str) -> RequestTracer:
        """Export spans in batches over OTLP/HTTP (protobuf) to ``endpoint``, e.g.
        ``http://otel-collector:4318/v1/traces``."""
        check_tracing_available(endpoint)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        return cls.with_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))

    @classmethod
    def with_processor(cls, processor: Any) -> RequestTracer:
        """A tracer with its own provider (the process-wide one is left alone) feeding ``processor``."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        from llmctl_server import __version__

        provider = TracerProvider(resource=Resource.create({"service.name": "llmctl",
                                                            "service.version": __version__}))
        provider.add_span_processor(processor)
        return cls(provider.get_tracer("llmctl_server", __version__), provider)

    def request_done(self, request_id: str, model: str, headers: Mapping[str, str], params: Sequence[Any],
                     outputs: Sequence[Any], recorder: Any) -> None:
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        now_mono, now_ns = time.monotonic(), time.time_ns()
        start_ns = now_ns - int((now_mono - recorder.arrival) * 1e9)
        parent = TraceContextTextMapPropagator().extract(carrier={k.lower(): v for k, v in headers.items()})
        attrs: dict[str, Any] = {
            "gen_ai.request.id": request_id,
            "gen_ai.response.model": model,
            "gen_ai.usage.prompt_tokens": sum(len(getattr(o, "prompt_token_ids", None) or []) for o in outputs),
            "gen_ai.usage.completion_tokens": sum(len(c.token_ids) for o in outputs
                                                  for c in getattr(o, "outputs", [])),
            "gen_ai.latency.e2e": now_mono - recorder.arrival,
        }
        if params:
            sp = params[0]
            for name in ("temperature", "top_p", "max_tokens", "n"):
                value = getattr(sp, name, None)
                if value is not None:
                    attrs[f"gen_ai.request.{name}"] = value
        if recorder.first is not None:
            attrs["gen_ai.latency.time_to_first_token"] = recorder.first - recorder.arrival
        m = getattr(outputs[0], "metrics", None) if outputs else None
        if m is not None:
            scheduled, first, last = m.first_scheduled_time, m.first_token_time, m.last_token_time
            if scheduled is not None:
                attrs["gen_ai.latency.time_in_queue"] = max(0.0, scheduled - m.arrival_time)
            if scheduled is not None and first is not None:
                attrs["gen_ai.latency.time_in_model_prefill"] = max(0.0, first - scheduled)
            if first is not None and last is not None:
                attrs["gen_ai.latency.time_in_model_decode"] = max(0.0, last - first)
            if scheduled is not None and last is not None:
                attrs["gen_ai.latency.time_in_model_inference"] = max(0.0, last - scheduled)
        span = self._tracer.start_span(SPAN_NAME, context=parent, kind=SpanKind.SERVER, attributes=attrs,
                                       start_time=start_ns)
        span.end(end_time=now_ns)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()
