"""Asynchronous HTTP load generator for any OpenAI-compatible server (``/v1/completions``, streamed).

Requests arrive as a Poisson process at ``request_rate`` per second (``inf``: all at once) and/or are capped at
``max_concurrency`` in flight. Prompts are seeded random token ids (the server must accept token-id prompts, as
vLLM's and llmctl's do) or random English-like text. For each request it records the time to first token
(TTFT), the gaps between streamed chunks (ITL), time per output token after the first (TPOT) and end-to-end
latency, and reports their mean/p50/p90/p99 plus request and output-token throughput. ``plot_result`` draws
latency histograms and output throughput over time (matplotlib, imported lazily).

Needs ``httpx`` (imported lazily). It lives with the ``llmctl`` command rather than in core, which knows no HTTP;
``llmctl bench serve`` (``llmctl_cli.bench_serve``) wraps it.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from llmctl.bench.common import percentile, percentiles, random_token_prompts

_WORDS = ("the of and to in is was that for on with as by at from his her an which one all were there "
          "time year people way day man thing woman life child world school state family student group "
          "country problem hand part place case week company system program question work government "
          "number night point home water room mother area money story fact month lot right study book eye "
          "job word business issue side kind head house service friend father power hour game line end "
          "member law car city community name president team minute idea kid body information back parent "
          "face others level office door health person art war history party result change morning reason "
          "research girl guy moment air teacher force education").split()


@dataclass
class RequestRecord:
    ok: bool = False
    start: float = 0.0  # seconds since the run started
    ttft: float = math.nan
    e2e: float = math.nan
    chunk_times: list[float] = field(default_factory=list)  # arrival of each streamed chunk, since run start
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str = ""


@dataclass
class ServeLoadResult:
    base_url: str
    model: str
    num_prompts: int
    completed: int
    failed: int
    request_rate: float
    max_concurrency: int | None
    duration_s: float
    total_input_tokens: int | None
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float | None
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    errors: list[str]
    records: list[RequestRecord] = field(default_factory=list, repr=False)

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_records:
            d.pop("records")
        return d


def make_prompts(num_prompts: int, input_len: int, kind: str = "token-ids", vocab_size: int = 32000,
                 seed: int = 0) -> list[Any]:
    """Token-id lists (the shared workload's generator) or space-joined random words (~``input_len`` words)."""
    if kind == "token-ids":
        return random_token_prompts(num_prompts, input_len, vocab_size, seed)
    if kind == "random-text":
        rng = random.Random(seed)
        return [" ".join(rng.choice(_WORDS) for _ in range(input_len)) for _ in range(num_prompts)]
    raise ValueError(f"prompt_kind: expected 'token-ids' or 'random-text', got {kind!r}")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _one_request(client: Any, url: str, body: dict[str, Any], t0: float, rec: RequestRecord) -> None:
    start = time.perf_counter()
    rec.start = start - t0
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {text[:200]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if msg.get("error"):
                    rec.error = str(msg["error"])[:200]
                    return
                if msg.get("usage"):
                    usage_tokens = msg["usage"].get("completion_tokens")
                    rec.prompt_tokens = msg["usage"].get("prompt_tokens")
                choices = msg.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("finish_reason") is None):
                    now = time.perf_counter()
                    if not chunks:
                        rec.ttft = now - start
                    rec.chunk_times.append(now - t0)
                    chunks += 1
        rec.e2e = time.perf_counter() - start
        rec.output_tokens = int(usage_tokens) if usage_tokens is not None else chunks
        rec.ok = chunks > 0
        if not rec.ok:
            rec.error = "stream ended without any token"
    except Exception as exc:  # network errors, bad JSON: count the request as failed, go on
        rec.error = f"{type(exc).__name__}: {exc}"[:200]


async def run_serve_load(base_url: str, model: str, *, num_prompts: int = 64, input_len: int = 128,
                         output_len: int = 128, request_rate: float = math.inf, max_concurrency: int | None = None,
                         prompt_kind: str = "token-ids", vocab_size: int = 32000, seed: int = 0,
                         ignore_eos: bool = True, api_key: str | None = None, timeout_s: float = 600.0,
                         prompts: list[Any] | None = None) -> ServeLoadResult:
    """Send ``num_prompts`` streamed completions to ``base_url`` (``http://host:port``, with or without ``/v1``)."""
    import httpx

    if request_rate <= 0:
        raise ValueError(f"request_rate: must be > 0 (inf for all at once), got {request_rate}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency: must be >= 1, got {max_concurrency}")
    base = base_url.rstrip("/")
    url = (base if base.endswith("/v1") else base + "/v1") + "/completions"
    if prompts is None:
        prompts = make_prompts(num_prompts, input_len, prompt_kind, vocab_size, seed)
    rng = random.Random(seed + 1)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    records = [RequestRecord() for _ in prompts]
    limits = httpx.Limits(max_connections=max(max_concurrency or len(prompts), 1) + 4, max_keepalive_connections=None)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits,
                                 headers=_headers(api_key)) as client:
        async def limited(body: dict[str, Any], rec: RequestRecord, t0: float) -> None:
            if sem is None:
                await _one_request(client, url, body, t0, rec)
                return
            async with sem:
                await _one_request(client, url, body, t0, rec)

        tasks = []
        t0 = time.perf_counter()
        for prompt, rec in zip(prompts, records):
            body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}}
            if ignore_eos:
                body["ignore_eos"] = True
            tasks.append(asyncio.create_task(limited(body, rec, t0)))
            if math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return summarize(base_url, model, records, duration, request_rate, max_concurrency)


def summarize(base_url: str, model: str, records: list[RequestRecord], duration: float, request_rate: float,
              max_concurrency: int | None) -> ServeLoadResult:
    ok = [r for r in records if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = None if any(r.prompt_tokens is None for r in ok) or not ok else sum(r.prompt_tokens or 0 for r in ok)
    errors = sorted({r.error for r in records if not r.ok and r.error})[:5]
    return ServeLoadResult(
        base_url=base_url, model=model, num_prompts=len(records), completed=len(ok), failed=len(records) - len(ok),
        request_rate=request_rate, max_concurrency=max_concurrency, duration_s=duration,
        total_input_tokens=in_tokens, total_output_tokens=out_tokens, request_throughput=len(ok) / duration,
        output_throughput=out_tokens / duration,
        total_token_throughput=None if in_tokens is None else (in_tokens + out_tokens) / duration,
        ttft_ms=percentiles(ttft, scale=1000.0), tpot_ms=percentiles(tpot, scale=1000.0),
        itl_ms=percentiles(itl, scale=1000.0), e2e_ms=percentiles([r.e2e for r in ok], scale=1000.0),
        errors=errors, records=records)


def run_serve_load_sync(base_url: str, model: str, **kwargs: Any) -> ServeLoadResult:
    return asyncio.run(run_serve_load(base_url, model, **kwargs))


def wait_until_ready(base_url: str, model: str, timeout_s: float = 300.0, proc: Any = None,
                     api_key: str | None = None) -> float:
    """Poll until a one-token completion succeeds; return the seconds waited. ``proc`` (a ``Popen``) that exits
    first raises ``RuntimeError``."""
    import httpx

    base = base_url.rstrip("/")
    url = (base if base.endswith("/v1") else base + "/v1") + "/completions"
    start = time.perf_counter()
    body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0.0}
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before answering")
        try:
            r = httpx.post(url, json=body, timeout=30.0, headers=_headers(api_key))
            if r.status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")
        time.sleep(0.25)


def mean_in_flight(intervals: list[tuple[float, float]], bin_s: float, nbins: int) -> list[float]:
    """The time-averaged number of requests in flight in each bin: each request adds the fraction of the bin it
    overlaps. Counting every request that touched a bin instead overstated concurrency whenever several short
    requests followed one another within one bin (ten 0.1 s requests in a row read as ten in flight)."""
    inflight = [0.0] * nbins
    for start, end in intervals:
        if end <= start:
            continue
        for b in range(max(0, int(start / bin_s)), min(int(end / bin_s), nbins - 1) + 1):
            lo, hi = max(start, b * bin_s), min(end, (b + 1) * bin_s)
            if hi > lo:
                inflight[b] += (hi - lo) / bin_s
    return inflight


def plot_result(result: ServeLoadResult, path: str, title: str | None = None) -> None:
    """Save a PNG: TTFT/TPOT/ITL/E2E histograms and output tokens/s over time (1 s bins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result.records if r.ok]
    series = {
        "TTFT (ms)": [r.ttft * 1000 for r in ok],
        "TPOT (ms)": [(r.e2e - r.ttft) / (r.output_tokens - 1) * 1000 for r in ok if r.output_tokens > 1],
        "ITL (ms)": [(b - a) * 1000 for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])],
        "E2E latency (ms)": [r.e2e * 1000 for r in ok],
    }
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (name, vals) in zip(axes.flat, series.items()):
        spread = (max(vals) - min(vals)) if vals else 0.0
        bins = 40 if spread > 1e-6 * max(1.0, abs(max(vals))) else 1  # identical values: numpy needs one bin
        ax.hist(vals, bins=bins, color="tab:blue", alpha=0.8)
        if vals:
            for q, style in ((50, "-"), (99, "--")):
                ax.axvline(percentile(vals, q), color="tab:red", linestyle=style, label=f"p{q}")
            ax.legend()
        ax.set_title(name)
        ax.set_ylabel("count")
    # Output tokens/s over time (1 s bins; shorter runs get 20 bins): each record's tokens over its chunks.
    bin_s = 1.0 if result.duration_s >= 20 else max(result.duration_s / 20, 1e-3)
    nbins = max(1, math.ceil(result.duration_s / bin_s))
    per_bin = [0.0] * nbins
    for r in ok:
        if r.chunk_times:
            weight = r.output_tokens / len(r.chunk_times)
            for t in r.chunk_times:
                per_bin[min(int(t / bin_s), nbins - 1)] += weight
    inflight = mean_in_flight([(r.start, r.start + (r.e2e if math.isfinite(r.e2e) else 0.0)) for r in ok],
                              bin_s, nbins)
    xs = [i * bin_s for i in range(nbins)]
    ax = axes.flat[4]
    ax.plot(xs, [v / bin_s for v in per_bin], marker=".", drawstyle="steps-post")
    ax.set_title("output tokens/s over time")
    ax.set_xlabel("s since start")
    ax = axes.flat[5]
    ax.plot(xs, inflight, marker=".", drawstyle="steps-post", color="tab:green")
    ax.set_title("requests in flight")
    ax.set_xlabel("s since start")
    fig.suptitle(title or f"{result.model} @ {result.base_url}: {result.completed}/{result.num_prompts} ok, "
                          f"{result.output_throughput:.1f} output tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@dataclass
class TradeoffPoint:
    """One server setting's place on the TTFT/TPOT curve: what a run at that setting measured."""

    label: str
    ttft_p50_ms: float
    ttft_p90_ms: float
    tpot_p50_ms: float
    output_throughput: float
    max_concurrency: int | None = None


def tradeoff_point(result: ServeLoadResult, label: str) -> TradeoffPoint:
    return TradeoffPoint(label, result.ttft_ms["p50"], result.ttft_ms["p90"], result.tpot_ms["p50"],
                         result.output_throughput, result.max_concurrency)


def append_tradeoff(path: str, point: TradeoffPoint) -> list[TradeoffPoint]:
    """Add ``point`` to the JSON-lines file ``path`` (one run per line, created when missing); return every
    point in it. Why a file: each point is a separate server launch (the setting is the server's), so the curve
    is gathered over several ``llmctl bench serve`` runs. An empty label becomes ``run N``."""
    from pathlib import Path

    p = Path(path)
    lines = [line for line in (p.read_text().splitlines() if p.exists() else []) if line.strip()]
    if not point.label:
        point = TradeoffPoint(**{**asdict(point), "label": f"run {len(lines) + 1}"})
    lines.append(json.dumps(asdict(point)))
    p.write_text("\n".join(lines) + "\n")
    return [TradeoffPoint(**json.loads(line)) for line in lines]


def plot_tradeoff(points: list[TradeoffPoint], path: str, title: str | None = None) -> None:
    """Save a PNG of TTFT against TPOT, one marker per run in the given order (p50 solid, p90 hollow), each
    labelled, plus output throughput per run: the cost in decode speed of each TTFT gain is read off directly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not points:
        raise ValueError("points: the trade-off plot needs at least one run")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5))
    xs = [p.tpot_p50_ms for p in points]
    ax.plot(xs, [p.ttft_p50_ms for p in points], marker="o", color="tab:blue", label="TTFT p50")
    ax.plot(xs, [p.ttft_p90_ms for p in points], marker="o", mfc="none", linestyle="--", color="tab:blue",
            label="TTFT p90")
    for p in points:
        ax.annotate(p.label, (p.tpot_p50_ms, p.ttft_p50_ms), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("TPOT p50 (ms)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("TTFT against TPOT")
    ax.legend()
    bx.bar(range(len(points)), [p.output_throughput for p in points], color="tab:green")
    bx.set_xticks(range(len(points)), [p.label for p in points], rotation=30, ha="right")
    bx.set_ylabel("output tokens/s")
    bx.set_title("throughput")
    fig.suptitle(title or "TTFT/TPOT trade-off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
