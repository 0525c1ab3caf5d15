"""The benchmark library (``llmctl.bench``) on the tiny random Llama: counts must be self-consistent."""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import pytest
from llmctl import LLM
from llmctl.bench.common import percentile, random_token_prompts
from llmctl.bench.latency import run_latency
from llmctl.bench.throughput import load_jsonl, run_throughput

KV = 32 << 20


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), kv_cache_memory=KV, seed=0)


def test_random_prompts_are_seeded_and_sized():
    a = random_token_prompts(3, 5, 1000, seed=1)
    assert a == random_token_prompts(3, 5, 1000, seed=1)
    assert a != random_token_prompts(3, 5, 1000, seed=2)
    assert [len(p) for p in a] == [5, 5, 5] and all(100 <= t < 1000 for p in a for t in p)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and math.isnan(percentile([], 50))


def test_throughput_counts(tiny_llama_dir, tiny_llm):
    r = run_throughput(str(tiny_llama_dir), input_len=12, output_len=7, num_prompts=5, llm=tiny_llm)
    assert r.num_prompts == 5 and r.prompt_tokens == 5 * 12
    assert r.output_tokens == r.expected_output_tokens == 5 * 7  # ignore_eos: every request runs to output_len
    assert r.elapsed_s > 0 and r.output_tokens_per_s == pytest.approx(r.output_tokens / r.elapsed_s)
    assert r.total_tokens_per_s == pytest.approx((r.prompt_tokens + r.output_tokens) / r.elapsed_s)
    assert r.requests_per_s == pytest.approx(5 / r.elapsed_s)
    json.dumps(r.to_dict())


def test_throughput_jsonl_dataset(tiny_llama_dir, tiny_llm, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello there", "output_len": 3}\n\n{"prompt": [101, 102, 103], "output_len": 5}\n'
                    '{"prompt": "ignored: past num_prompts"}\n')
    assert len(load_jsonl(path)) == 3
    r = run_throughput(str(tiny_llama_dir), dataset=path, num_prompts=2, llm=tiny_llm, warmup=False)
    assert r.num_prompts == 2 and r.output_tokens == r.expected_output_tokens == 8
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_jsonl(bad)


def test_latency_counts(tiny_llama_dir, tiny_llm):
    r = run_latency(str(tiny_llama_dir), batch_size=3, input_len=8, output_len=6, iterations=2,
                    warmup_iterations=1, llm=tiny_llm)
    assert r.num_requests == 6 and r.output_tokens == 6 * 6
    for stats in (r.ttft_ms, r.tpot_ms, r.decode_step_ms, r.batch_latency_s):
        assert stats["p50"] > 0 and stats["p50"] <= stats["p90"] <= stats["p99"]
    assert r.ttft_ms["p50"] / 1000 <= r.batch_latency_s["p99"]
    assert tiny_llm.get_stats()["num_running"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(tiny_llama_dir):
    llmctl_server = pytest.importorskip("llmctl_server", reason="the llmctl server package is not installed")
    uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed")
    pytest.importorskip("httpx", reason="httpx (serve_load's HTTP client) is not installed")
    from llmctl import AsyncLLM, EngineArgs

    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(tiny_llama_dir), kv_cache_memory=KV, seed=0))
    app = llmctl_server.build_app(engine, llmctl_server.ServerSettings(served_model_names=["tiny"]))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the in-process llmctl server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()


@pytest.mark.parametrize("kind,rate,conc", [("token-ids", math.inf, 3), ("random-text", 50.0, None)])
def test_serve_load_against_llmctl_server(live_server, tmp_path, kind, rate, conc):
    from llmctl_cli.serve_load import plot_result, run_serve_load_sync, wait_until_ready

    assert wait_until_ready(live_server, "tiny", timeout_s=30) >= 0
    r = run_serve_load_sync(live_server, "tiny", num_prompts=6, input_len=10, output_len=5, request_rate=rate,
                            max_concurrency=conc, prompt_kind=kind, vocab_size=1000)
    assert r.errors == [] and r.completed == 6 and r.failed == 0
    assert r.total_output_tokens == 6 * 5  # ignore_eos, counted from the usage chunk
    if kind == "token-ids":
        assert r.total_input_tokens == 6 * 10
    assert r.ttft_ms["p50"] > 0 and r.e2e_ms["p50"] >= r.ttft_ms["p50"] and r.itl_ms["p50"] >= 0
    assert r.output_throughput == pytest.approx(r.total_output_tokens / r.duration_s)
    json.dumps(r.to_dict())
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (only --plot needs it)")
    png = tmp_path / "load.png"
    plot_result(r, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_in_flight_never_exceeds_max_concurrency(live_server):
    """The plot's in-flight panel, from a real load run capped at two: never above two in any bin."""
    from llmctl_cli.serve_load import mean_in_flight, run_serve_load_sync

    r = run_serve_load_sync(live_server, "tiny", num_prompts=8, input_len=6, output_len=4, max_concurrency=2,
                            vocab_size=1000)
    assert r.completed == 8
    spans = [(rec.start, rec.start + rec.e2e) for rec in r.records]
    for bin_s in (r.duration_s / 20, r.duration_s / 3, 1e-3):
        counts = mean_in_flight(spans, bin_s, math.ceil(r.duration_s / bin_s))
        assert max(counts) <= 2 + 1e-9
    # and no instant has more than two open: sweep the starts and ends
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    open_now = peak = 0
    for _, d in events:
        open_now += d
        peak = max(peak, open_now)
    assert peak <= 2


def test_tradeoff_points_gather_across_runs_and_plot(tmp_path):
    from llmctl_cli.serve_load import ServeLoadResult, append_tradeoff, plot_tradeoff, tradeoff_point

    def result(ttft: float, tpot: float) -> ServeLoadResult:
        pct = {"mean": ttft, "p50": ttft, "p90": ttft * 1.5, "p99": ttft * 2}
        return ServeLoadResult("u", "m", 4, 4, 0, math.inf, 16, 1.0, 4, 8, 4.0, 8.0, 12.0, pct,
                               {"mean": tpot, "p50": tpot, "p90": tpot, "p99": tpot}, pct, pct, [])

    path = tmp_path / "curve.jsonl"
    first = append_tradeoff(str(path), tradeoff_point(result(700.0, 20.0), "mnbt=1024"))
    points = append_tradeoff(str(path), tradeoff_point(result(300.0, 24.0), ""))
    assert [p.label for p in first] == ["mnbt=1024"]
    assert [p.label for p in points] == ["mnbt=1024", "run 2"]  # an empty label is numbered
    assert [(p.ttft_p50_ms, p.ttft_p90_ms, p.tpot_p50_ms) for p in points] == [(700.0, 1050.0, 20.0),
                                                                                 (300.0, 450.0, 24.0)]
    assert points[1].max_concurrency == 16
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (only the plots need it)")
    png = tmp_path / "curve.png"
    plot_tradeoff(points, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="points"):
        plot_tradeoff([], str(png))


def test_serve_load_counts_failures():
    pytest.importorskip("httpx", reason="httpx is not installed")
    from llmctl_cli.serve_load import run_serve_load_sync

    r = run_serve_load_sync(f"http://127.0.0.1:{_free_port()}", "none", num_prompts=2, input_len=4, output_len=2,
                            vocab_size=1000, timeout_s=5)
    assert r.completed == 0 and r.failed == 2 and r.errors


def test_in_flight_per_bin_is_a_time_average_not_a_count_of_requests_touching_the_bin():
    from llmctl_cli.serve_load import mean_in_flight

    one_after_another = [(i * 0.1, (i + 1) * 0.1) for i in range(10)]  # one at a time, ten in the first second
    assert mean_in_flight(one_after_another, 1.0, 2) == pytest.approx([1.0, 0.0])
    overlapping = [(0.0, 2.0), (0.5, 1.5), (1.0, 1.25)]
    assert mean_in_flight(overlapping, 1.0, 2) == pytest.approx([1.5, 1.75])
    assert mean_in_flight([(0.0, 0.0), (3.0, 2.0)], 1.0, 3) == [0.0, 0.0, 0.0]  # empty or reversed: nothing
    assert mean_in_flight([(0.5, 10.0)], 1.0, 2) == pytest.approx([0.5, 1.0])  # past the last bin: clipped
