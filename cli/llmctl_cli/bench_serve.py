"""``llmctl bench serve``: drive any OpenAI-compatible server and report TTFT/TPOT/ITL/E2E; mounted on core's
``bench_app`` by the ``llmctl`` command (core's benchmarks know no HTTP)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from llmctl.bench.cli import exit_with_error, percentile_rows, print_table
from llmctl.bench.common import rounded

from llmctl_cli.serve_load import append_tradeoff, plot_result, plot_tradeoff, run_serve_load_sync, tradeoff_point


def serve(
    base_url: str = typer.Option(..., help="Server root, e.g. http://127.0.0.1:8000 (with or without /v1)."),
    model: str = typer.Option(..., help="Model name the server expects in 'model'."),
    num_prompts: int = typer.Option(64, help="Number of requests."),
    input_len: int = typer.Option(128, help="Prompt length (token ids, or words for random-text)."),
    output_len: int = typer.Option(128, help="max_tokens of each request."),
    request_rate: float = typer.Option(math.inf, help="Poisson arrival rate in requests/s (inf: all at once)."),
    max_concurrency: int | None = typer.Option(None, help="Most requests in flight."),
    prompt_kind: str = typer.Option("token-ids", help="token-ids or random-text."),
    vocab_size: int = typer.Option(32000, help="Token ids are drawn from [100, vocab_size)."),
    seed: int = typer.Option(0, help="Seed of prompts and arrivals."),
    ignore_eos: bool = typer.Option(True, "--ignore-eos/--no-ignore-eos", help="Send ignore_eos (vLLM extension)."),
    api_key: str | None = typer.Option(None, envvar="OPENAI_API_KEY", help="Bearer token."),
    timeout: float = typer.Option(600.0, help="Per-request timeout in seconds."),
    plot: str | None = typer.Option(None, help="Save latency histograms and throughput over time to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    tradeoff: str | None = typer.Option(
        None, help="Append this run's TTFT/TPOT to this JSON-lines file and plot every run in it to the same "
                   "name with .png: run once per server setting (e.g. --max-num-batched-tokens) to draw the "
                   "trade-off curve."),
    label: str | None = typer.Option(None, help="This run's name on the --tradeoff plot (default: run N)."),
) -> None:
    """Drive an OpenAI-compatible server with streamed /v1/completions; report TTFT/TPOT/ITL/E2E."""
    try:
        r = run_serve_load_sync(base_url, model, num_prompts=num_prompts, input_len=input_len,
                                output_len=output_len, request_rate=request_rate, max_concurrency=max_concurrency,
                                prompt_kind=prompt_kind, vocab_size=vocab_size, seed=seed, ignore_eos=ignore_eos,
                                api_key=api_key, timeout_s=timeout)
    except ValueError as exc:
        raise exit_with_error(exc) from None
    if plot:
        plot_result(r, plot)
    if tradeoff:
        points = append_tradeoff(tradeoff, tradeoff_point(r, label or ""))
        plot_tradeoff(points, str(Path(tradeoff).with_suffix(".png")))
    if as_json:
        typer.echo(json.dumps(rounded(r.to_dict())))
    else:
        print_table(f"serving benchmark: {model} @ {base_url}", [
            ("completed / sent", f"{r.completed} / {r.num_prompts}"), ("duration (s)", r.duration_s),
            ("request rate", r.request_rate), ("max concurrency", r.max_concurrency),
            ("input tokens", r.total_input_tokens), ("output tokens", r.total_output_tokens),
            ("requests/s", r.request_throughput), ("output tokens/s", r.output_throughput),
            ("total tokens/s", r.total_token_throughput), *percentile_rows("TTFT ms", r.ttft_ms),
            *percentile_rows("TPOT ms", r.tpot_ms), *percentile_rows("ITL ms", r.itl_ms),
            *percentile_rows("E2E ms", r.e2e_ms)])
        for err in r.errors:
            typer.echo(f"error sample: {err}", err=True)
    if r.completed == 0:
        raise typer.Exit(1)
