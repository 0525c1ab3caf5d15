"""``llmctl bench``: a typer sub-app (``bench_app``) with ``throughput`` and ``latency``.

This module imports ``typer`` at import time (it defines the app); ``rich`` is imported only by the commands
that use it. The library functions it wraps live in ``throughput`` and ``latency``. ``llmctl bench serve``, an
HTTP load generator, lives with the HTTP client in ``llmctl_cli.serve_load`` and is mounted on this app by
the ``llmctl`` command.
"""

from __future__ import annotations

import json
import math
from typing import Any

import typer

from llmctl.bench.common import rounded

bench_app = typer.Typer(name="bench", help="Benchmark llmctl offline, or any OpenAI-compatible server.",
                        no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _kv_memory(value: str | None) -> int | float | None:
    if value is None:
        return None
    v = float(value)
    return v if v <= 1 else int(v)


def _engine_kwargs(device: str | None, max_num_seqs: int | None, kv_cache_memory: str | None,
                   max_model_len: int | None, kv_cache_dtype: str = "auto",
                   quantization: str | None = None) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if quantization:
        kw["quantization"] = quantization
    if kv_cache_dtype != "auto":
        kw["kv_cache_dtype"] = kv_cache_dtype
    if device:
        kw["device"] = device
    if max_num_seqs:
        kw["max_num_seqs"] = max_num_seqs
    if kv_cache_memory:
        try:
            kw["kv_cache_memory"] = _kv_memory(kv_cache_memory)
        except ValueError:
            raise typer.BadParameter(f"expected a fraction or a byte count, got {kv_cache_memory!r}",
                                     param_hint="--kv-cache-memory") from None
    if max_model_len:
        kw["max_model_len"] = max_model_len
    return kw


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for name, value in rows:
        if isinstance(value, float):
            value = "n/a" if math.isnan(value) else f"{value:,.2f}"
        table.add_row(name, str(value))
    Console().print(table)


def percentile_rows(label: str, stats: dict[str, float]) -> list[tuple[str, Any]]:
    return [(f"{label} {k}", v) for k, v in stats.items()]


def exit_with_error(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


@bench_app.command()
def throughput(
    model: str = typer.Argument(..., help="Model dir, HF repo id or .gguf file."),
    input_len: int = typer.Option(128, help="Prompt length in tokens (random dataset)."),
    output_len: int = typer.Option(128, help="Tokens generated per request (ignore_eos)."),
    num_prompts: int = typer.Option(64, help="Number of requests."),
    dataset: str | None = typer.Option(None, help='JSONL file of {"prompt": ..., "output_len": ...} lines, or '
                                                  '"copy" (repeat a given text: where speculation pays off).'),
    seed: int = typer.Option(0, help="Seed of the random dataset."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16."),
    device: str | None = typer.Option(None, help="Platform name or torch device type."),
    max_num_seqs: int | None = typer.Option(None, help="Most sequences per engine step."),
    max_model_len: int | None = typer.Option(None, help="Context length."),
    kv_cache_memory: str | None = typer.Option(None, help="Fraction of free memory (<= 1) or bytes."),
    kv_cache_dtype: str = typer.Option("auto", help="KV cache storage: auto (the model dtype), fp8 (= fp8_e4m3), "
                                                    "fp8_e5m2 or int8 (8-bit codes with a scale per token and head)."),
    quantization: str | None = typer.Option(
        None, "--quantization", "-q",
        help="Weight quantization, as `llmctl serve`: default the checkpoint's own; int8 or fp8 quantize an "
             "unquantized checkpoint at load; none dequantizes a GGUF at load."),
    speculative_config: str | None = typer.Option(
        None, help='Speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'.'),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    task: str = typer.Option("generate", help="generate, or embed: sequences/s of a pooling model's embeddings "
                                              "(--input-len counts words of random text)."),
    baseline: str | None = typer.Option(None, help="With --task embed: sentence-transformers, timed on the same "
                                                   "texts in this run."),
) -> None:
    """Offline throughput: requests/s and tokens/s of one batch (model load excluded, reported apart)."""
    from llmctl.bench.throughput import run_throughput

    if task == "embed":
        _embed_throughput(model, input_len, num_prompts, seed, dtype, baseline, as_json,
                          _engine_kwargs(device, max_num_seqs, kv_cache_memory, max_model_len, kv_cache_dtype,
                                         quantization))
        return
    if task != "generate" or baseline is not None:
        raise exit_with_error(ValueError("--task must be generate or embed; --baseline needs --task embed"))
    try:
        r = run_throughput(model, input_len=input_len, output_len=output_len, num_prompts=num_prompts,
                           dataset=dataset, seed=seed, dtype=dtype,
                           **_engine_kwargs(device, max_num_seqs, kv_cache_memory, max_model_len, kv_cache_dtype,
                                            quantization),
                           **({"speculative_config": speculative_config} if speculative_config else {}))
    except (ValueError, OSError) as exc:
        raise exit_with_error(exc) from None
    if as_json:
        typer.echo(json.dumps(rounded(r.to_dict())))
        return
    print_table(f"llmctl throughput: {model} ({r.dtype})", [
        ("dataset", r.dataset), ("requests", r.num_prompts), ("prompt tokens", r.prompt_tokens),
        ("output tokens", r.output_tokens), ("load time (s)", r.load_s), ("elapsed (s)", r.elapsed_s),
        ("requests/s", r.requests_per_s), ("output tokens/s", r.output_tokens_per_s),
        ("total tokens/s", r.total_tokens_per_s), ("peak RSS (MiB)", r.peak_rss_mb),
        *([("spec acceptance rate", r.spec_acceptance_rate), ("spec tokens per step", r.spec_mean_tokens_per_step)]
          if r.spec_acceptance_rate is not None else [])])


def _embed_throughput(model: str, input_len: int, num_prompts: int, seed: int, dtype: str, baseline: str | None,
                      as_json: bool, engine_kwargs: dict[str, Any]) -> None:
    from llmctl.bench.embed_throughput import run_embed_throughput

    try:
        r = run_embed_throughput(model, num_prompts=num_prompts, input_len=input_len, seed=seed, dtype=dtype,
                                 baseline=baseline, **engine_kwargs)
    except (ValueError, OSError, ImportError) as exc:
        raise exit_with_error(exc) from None
    if as_json:
        typer.echo(json.dumps(rounded(r.to_dict())))
        return
    rows: list[tuple[str, Any]] = [
        ("sequences", r.num_prompts), ("prompt tokens", r.prompt_tokens), ("load time (s)", r.load_s),
        ("elapsed (s)", r.elapsed_s), ("sequences/s", r.sequences_per_s), ("tokens/s", r.tokens_per_s)]
    if r.baseline is not None:
        rows += [("baseline", r.baseline), ("baseline sequences/s", r.baseline_sequences_per_s),
                 ("speedup", r.speedup), ("min cosine vs baseline", r.min_cosine_vs_baseline)]
    print_table(f"llmctl embedding throughput: {model} ({r.dtype})", rows + [("peak RSS (MiB)", r.peak_rss_mb)])


@bench_app.command()
def latency(
    model: str = typer.Argument(..., help="Model dir, HF repo id or .gguf file."),
    batch_size: int = typer.Option(8, help="Requests submitted together."),
    input_len: int = typer.Option(128, help="Prompt length in tokens."),
    output_len: int = typer.Option(128, help="Tokens generated per request (ignore_eos)."),
    iterations: int = typer.Option(5, help="Timed batches."),
    warmup_iterations: int = typer.Option(1, help="Untimed batches first."),
    seed: int = typer.Option(0, help="Seed of the random prompts."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16."),
    device: str | None = typer.Option(None, help="Platform name or torch device type."),
    max_model_len: int | None = typer.Option(None, help="Context length."),
    kv_cache_memory: str | None = typer.Option(None, help="Fraction of free memory (<= 1) or bytes."),
    kv_cache_dtype: str = typer.Option("auto", help="KV cache storage: auto (the model dtype), fp8 (= fp8_e4m3), "
                                                    "fp8_e5m2 or int8 (8-bit codes with a scale per token and head)."),
    quantization: str | None = typer.Option(
        None, "--quantization", "-q",
        help="Weight quantization, as `llmctl serve`: default the checkpoint's own; int8 or fp8 quantize an "
             "unquantized checkpoint at load; none dequantizes a GGUF at load."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """TTFT, TPOT and decode-step time at a fixed batch size (p50/p90/p99 over all iterations)."""
    from llmctl.bench.latency import run_latency

    try:
        r = run_latency(model, batch_size=batch_size, input_len=input_len, output_len=output_len,
                        iterations=iterations, warmup_iterations=warmup_iterations, seed=seed, dtype=dtype,
                        **_engine_kwargs(device, None, kv_cache_memory, max_model_len, kv_cache_dtype, quantization))
    except (ValueError, OSError) as exc:
        raise exit_with_error(exc) from None
    if as_json:
        typer.echo(json.dumps(rounded(r.to_dict())))
        return
    print_table(f"llmctl latency: {model} ({r.dtype}), batch {batch_size}, {input_len} in / {output_len} out", [
        ("requests", r.num_requests), ("output tokens", r.output_tokens), ("load time (s)", r.load_s),
        *percentile_rows("TTFT ms", r.ttft_ms), *percentile_rows("TPOT ms", r.tpot_ms),
        *percentile_rows("decode step ms", r.decode_step_ms), *percentile_rows("batch latency s", r.batch_latency_s)])


def main() -> None:  # pragma: no cover - ``python -m llmctl.bench.cli``
    bench_app()


if __name__ == "__main__":  # pragma: no cover
    main()
