"""``llmctl``: serve an OpenAI-compatible API, generate or chat in the terminal, and diagnose the install.

User mistakes (a missing model, a bad flag value, no usable platform) end with one readable line and exit
code 2 or 1, never a traceback; ``LLMCTL_DEBUG=1`` shows tracebacks for bug reports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from llmctl_cli.default_model import DEFAULT_FILE, DEFAULT_SERVED_NAME, INSTALL_HINT, default_model_path

app = typer.Typer(name="llmctl", help="llmctl: plugin-based LLM inference and serving.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)
out = Console()

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Something the user can fix; printed as one line."""


def _fail(message: str, code: int = EXIT_USER_ERROR) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _debug() -> bool:
    return os.environ.get("LLMCTL_DEBUG") == "1"


# -- model and engine -----------------------------------------------------------------------------------------------
def resolve_model(model: str | None) -> str:
    if model:
        return model
    path = default_model_path()
    if path is None:
        raise UserError(f"no MODEL given and the default model (SmolLM2-135M-Instruct GGUF) is not installed: "
                        f"{INSTALL_HINT}")
    console.print(f"No MODEL given: using the default model SmolLM2-135M-Instruct (Q4_1 GGUF) at {path}",
                  highlight=False)
    return str(path)


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_kv_memory(value: str | None) -> int | float | None:
    """``0.5`` (fraction of free memory), ``4GiB``/``512MB`` or a byte count."""
    if value is None:
        return None
    m = _SIZE.match(value)
    if not m:
        raise UserError(f"--kv-cache-memory: expected a fraction like 0.5 or a size like 4GiB, got {value!r}")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if not unit and number <= 1.0:
        if number <= 0:
            raise UserError("--kv-cache-memory: must be > 0")
        return number
    if unit not in _UNITS:
        raise UserError(f"--kv-cache-memory: unknown unit in {value!r}")
    return int(number * _UNITS[unit])


def engine_args(model: str, **kw: Any) -> Any:
    from llmctl import EngineArgs

    try:
        return EngineArgs(model=model, **{k: v for k, v in kw.items() if v is not None})
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


def _json_option(value: str | None, flag: str) -> Any:
    if value is None:
        return None
    import json

    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise UserError(f"{flag}: not valid JSON ({exc.msg})") from None


def load_engine(args: Any) -> Any:
    """Build the AsyncLLM with a progress display; user-facing errors become UserError."""
    from llmctl import AsyncLLM
    from llmctl.engine.malloc_tuning import limit_malloc_arenas
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    limit_malloc_arenas()  # before the progress display starts its refresh thread
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        progress.add_task(f"Loading {Path(str(args.model)).name} ...", total=None)
        try:
            engine = AsyncLLM.from_engine_args(args)
        except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
            if _debug():
                raise
            raise UserError(f"could not load {args.model}: {exc}") from None
    mc = engine.model_config
    console.print(f"Loaded {mc.model} (max_model_len {mc.max_model_len}, dtype "
                  f"{str(mc.dtype).replace('torch.', '')})", highlight=False)
    return engine


def _run(fn: Any) -> None:
    """Run a command body, turning user errors into one-line messages."""
    try:
        fn()
    except typer.Exit:
        raise
    except UserError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:
        if _debug():
            raise
        raise _fail(f"{type(exc).__name__}: {exc} (set LLMCTL_DEBUG=1 for the traceback)", code=1) from None


# -- commands --------------------------------------------------------------------------------------------------------
@app.command()
def serve(
    model: str | None = typer.Argument(None, help="Model dir, HF repo id or .gguf file (default: SmolLM2 GGUF)."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16 (the activation dtype)."),
    quantization: str | None = typer.Option(
        None, "--quantization", "-q",
        help="Weight quantization: default the checkpoint's own (gguf, compressed-tensors, gptq, awq; a GGUF stays "
             "quantized); int8 or fp8 quantize an unquantized checkpoint at load; none dequantizes a GGUF at load."),
    max_model_len: int | None = typer.Option(None, help="Context length (default: the model's)."),
    device: str | None = typer.Option(None, help="Platform name or torch device type (also LLMCTL_DEVICE)."),
    kv_cache_memory: str | None = typer.Option(None, help="KV cache size: fraction of free memory or e.g. 4GiB."),
    kv_cache_dtype: str = typer.Option(
        "auto", help="KV cache storage: auto (the model dtype), fp8 (= fp8_e4m3), fp8_e5m2 or int8: 8-bit codes with a "
                     "scale per token and KV head, about twice the blocks of bf16 in the same memory."),
    gpu_memory_utilization: float | None = typer.Option(
        None, help="GPUs: share of the card the engine may fill; the KV cache gets what the weights and a profiled "
                   "step leave (default 0.9, or LLMCTL_GPU_MEMORY_UTILIZATION). Ignored with --kv-cache-memory."),
    max_num_seqs: int = typer.Option(256, help="Most sequences the engine runs at once."),
    max_num_batched_tokens: int | None = typer.Option(None, help="Token budget of one engine step."),
    long_prefill_token_threshold: int = typer.Option(
        0, help="Most prompt tokens of one request in one step (0 = no cap): long prefills and recomputes after "
                "preemption are spread over steps, so the decodes beside them keep a short inter-token gap."),
    max_num_partial_prefills: int | None = typer.Option(
        None, help="Most requests with a prompt chunk in one step (0 = no cap; default: the platform's, 1 on CPU "
                   "when serving): prompts that arrive together enter one step each, which lowers TTFT under "
                   "load and raises TPOT a little."),
    min_decode_steps_between_prefills: int | None = typer.Option(
        None, help="Steps of decodes alone after each step that carries a prompt chunk, while requests decode (0 = "
                   "none; default: the platform's, 0 on CPU for now): with 1, a request that arrives during a "
                   "prompt step waits for a short step, not for another prompt, before its own (lower TTFT at "
                   "many streams, see docs/performance.md)."),
    enable_prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching"),
    enforce_eager: bool = typer.Option(False, "--enforce-eager",
                                       help="Run decode steps eagerly instead of replaying captured GPU graphs."),
    seed: int = typer.Option(0, help="Engine random seed."),
    generation_config: str = typer.Option("auto", help="'auto' (model's sampling defaults) or 'none'."),
    tensor_parallel_size: int = typer.Option(
        1, "--tensor-parallel-size", "-tp", help="Ranks that each hold a slice of every layer (worker processes "
                                                "of this server with the default mp executor)."),
    pipeline_parallel_size: int = typer.Option(
        1, "--pipeline-parallel-size", "-pp", help="Stages that each hold a contiguous run of layers (not combined "
                                                  "with --tensor-parallel-size yet)."),
    enable_expert_parallel: bool = typer.Option(
        False, "--enable-expert-parallel", "-ep",
        help="Mixture-of-experts layers place whole experts on the tensor-parallel ranks (num_experts / tp each) "
             "instead of splitting every expert; with --data-parallel-size, over every replica's ranks "
             "(num_experts / (dp * tp) each); ignored for models without experts."),
    data_parallel_size: int = typer.Option(
        1, "--data-parallel-size", "-dp", help="Replicas of the whole model behind this server, each in its own "
                                              "worker processes; requests go to one by load and prefix affinity."),
    distributed_executor_backend: str | None = typer.Option(
        None, help="mp (worker processes, the default), ray (Ray actors, several machines), external_launcher "
                   "(this process is one rank started by torchrun) or uni (one process)."),
    chat_template: str | None = typer.Option(None, help="Chat template file (or template text)."),
    served_model_name: list[str] | None = typer.Option(
        None, help="Name(s) clients use in 'model' (default: MODEL as typed; SmolLM2-135M-Instruct for the default)."),
    host: str = typer.Option("127.0.0.1", help="Bind address."),
    port: int = typer.Option(8000, help="Port."),
    api_key: str | None = typer.Option(None, envvar="LLMCTL_API_KEY", show_envvar=True,
                                       help="Require 'Authorization: Bearer KEY'."),
    log_level: str = typer.Option("info", help="debug, info, warning, error."),
    max_queued_requests: int | None = typer.Option(
        None, help="503 + Retry-After once this many requests wait beyond the running ones (default: max-num-seqs)."),
    shutdown_timeout: float = typer.Option(30.0, help="Seconds running requests get to finish on SIGTERM."),
    metrics_public: bool = typer.Option(False, "--metrics-public", help="Serve /metrics without the API key."),
    max_n: int = typer.Option(16, help="Largest 'n' a request may ask for."),
    revision: str | None = typer.Option(None, help="Hub branch, tag or commit of MODEL."),
    tokenizer: str | None = typer.Option(None, help="Tokenizer dir or hub id (default: MODEL's)."),
    download_dir: str | None = typer.Option(None, help="Where hub downloads go (default: the Hugging Face cache)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Run the custom code a hub model ships (off by default)."),
    model_impl: str = typer.Option("auto", help="auto, native (llmctl's own) or transformers (the fallback)."),
    hf_overrides: str | None = typer.Option(None, help='JSON object set on the model config, e.g. '
                                                       '\'{"max_position_embeddings": 4096}\'.'),
    runner: str = typer.Option("auto", help="auto (from the checkpoint), generate, or pooling (embeddings, "
                                            "scores: /v1/embeddings, /score, /rerank)."),
    pooler_config: str | None = typer.Option(None, help='Pooling models: JSON such as {"pooling_type": "MEAN", '
                                                        '"normalize": true} over the checkpoint\'s own.'),
    stream_write_timeout: float = typer.Option(
        30.0, help="Abort a stream (and free its KV blocks) when its client has read nothing for this many seconds."),
    header_read_timeout: float = typer.Option(
        20.0, help="Close a connection that has not sent a complete request header within this many seconds."),
    max_idle_connections_per_client: int = typer.Option(512, help="Idle connections one client address may keep."),
    enable_auto_tool_choice: bool = typer.Option(False, "--enable-auto-tool-choice",
                                                 help="Let the model decide when to call tools (tool_choice=auto)."),
    tool_call_parser: str | None = typer.Option(None, help="hermes, llama3_json, mistral or pythonic."),
    reasoning_parser: str | None = typer.Option(None, help="deepseek_r1 or qwen3: split <think> output."),
    structured_outputs_backend: str = typer.Option("auto", help="Grammar engine for structured output: auto "
                                                   "(xgrammar, llguidance for what xgrammar refuses), xgrammar or "
                                                   "guidance (llguidance)."),
    structured_outputs_config: str | None = typer.Option(None, help='vLLM\'s JSON form, e.g. {"backend": "guidance"}.'),
    guided_decoding_backend: str | None = typer.Option(None, help="Older name of --structured-outputs-backend."),
    responses_store_size: int = typer.Option(0, help="/v1/responses: keep this many responses for "
                                                     "previous_response_id (0: off)."),
    enable_lora: bool = typer.Option(False, "--enable-lora", help="Serve LoRA adapters (by model name)."),
    lora_modules: list[str] | None = typer.Option(None, help="An adapter as name=path or JSON "
                                                  '{"name": ..., "path": ..., "base_model_name": ...}; repeatable.'),
    max_loras: int = typer.Option(1, help="LoRA adapters resident at once (the most distinct ones in a step)."),
    max_lora_rank: int = typer.Option(16, help="Largest LoRA rank accepted (up to 64)."),
    max_cpu_loras: int | None = typer.Option(None, help="LoRA adapters cached on the host (default: max_loras)."),
    allow_runtime_lora: bool = typer.Option(False, "--allow-runtime-lora",
                                            help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter."),
    lora_root: str | None = typer.Option(None, help="Directory run-time LoRA adapters must lie under."),
    speculative_config: str | None = typer.Option(
        None, help='Speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'.'),
    model_option: str | None = typer.Option(None, "--model", help="The model, as an option (vLLM's spelling; "
                                            "container images pass it this way). Same as MODEL."),
    metrics_prefix: str = typer.Option("llmctl", help="Metric names: 'llmctl' (llmctl_*) or 'vllm' (vLLM's "
                                       "vllm:* names, for existing vLLM dashboards)."),
    web_ui: bool = typer.Option(True, "--web-ui/--no-web-ui", help="Serve the browser console at /."),
    otlp_traces_endpoint: str | None = typer.Option(
        None, help="Send OpenTelemetry request traces to this OTLP/HTTP endpoint, e.g. "
                   "http://collector:4318/v1/traces (needs llmctl-server[tracing])."),
    limit_mm_per_prompt: str | None = typer.Option(
        None, help='Multimodal models: most images in one request, as JSON, e.g. \'{"image": 2}\' (default 1).'),
    allowed_media_domains: list[str] | None = typer.Option(
        None, help="Hosts image_url http(s) URLs may be fetched from (repeatable or comma-separated; default: "
                   "none, only data: URLs). Private, loopback and link-local addresses stay refused unless listed "
                   "as IP literals."),
    allowed_local_media_path: str | None = typer.Option(
        None, help="Directory image_url file: URLs may read from (default: file: URLs refused)."),
    max_image_bytes: int = typer.Option(10 * 1024 * 1024, help="Largest image (bytes) a request may send or "
                                        "have fetched."),
    max_image_pixels: int = typer.Option(4096 * 4096, help="Largest image (width x height), checked before "
                                         "decoding (decompression bombs)."),
    media_fetch_timeout: float = typer.Option(5.0, help="Seconds one image fetch may take, redirects included."),
) -> None:
    """Serve MODEL with an OpenAI-compatible API (/v1/completions, /v1/chat/completions, ...)."""

    def body() -> None:
        from llmctl_server.chat_template import load_template_source
        from llmctl_server.launcher import run_server
        from llmctl_server.settings import ServerSettings

        level = log_level.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise UserError(f"--log-level: expected debug, info, warning or error, got {log_level!r}")
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            template = load_template_source(chat_template)
            settings = ServerSettings(served_model_names=list(served_model_name or []), api_key=api_key or None,
                                      chat_template=template, max_n=max_n, max_queued_requests=max_queued_requests,
                                      metrics_public=metrics_public, shutdown_timeout=shutdown_timeout,
                                      stream_write_timeout=stream_write_timeout,
                                      header_read_timeout=header_read_timeout,
                                      max_idle_connections_per_client=max_idle_connections_per_client,
                                      enable_auto_tool_choice=enable_auto_tool_choice,
                                      tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser,
                                      responses_store_size=responses_store_size,
                                      metrics_prefix=metrics_prefix, web_ui=web_ui,
                                      otlp_traces_endpoint=otlp_traces_endpoint or None,
                                      lora_modules=list(lora_modules or []), allow_runtime_lora=allow_runtime_lora,
                                      lora_root=lora_root,
                                      allowed_media_domains=[d for item in (allowed_media_domains or [])
                                                             for d in item.replace(",", " ").split()],
                                      allowed_local_media_path=allowed_local_media_path,
                                      max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
                                      media_fetch_timeout=media_fetch_timeout)
            if settings.otlp_traces_endpoint:
                from llmctl_server.tracing import check_tracing_available

                check_tracing_available(settings.otlp_traces_endpoint)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if model is not None and model_option is not None and model != model_option:
            raise UserError(f"--model: got both MODEL {model!r} and --model {model_option!r}; give one")
        chosen = model if model is not None else model_option
        name = resolve_model(chosen)
        if chosen is None and not settings.served_model_names:
            # As vLLM: the id is what the user typed; with nothing typed, the default model's name, never the
            # install path of its file (which would leak the server's directory layout to every client).
            settings.served_model_names = [DEFAULT_SERVED_NAME]
            settings.model_root = DEFAULT_FILE
        args = engine_args(name, dtype=dtype, quantization=quantization, max_model_len=max_model_len, device=device,
                           kv_cache_memory=parse_kv_memory(kv_cache_memory), kv_cache_dtype=kv_cache_dtype,
                           gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens,
                           long_prefill_token_threshold=long_prefill_token_threshold,
                           max_num_partial_prefills=max_num_partial_prefills,
                           min_decode_steps_between_prefills=min_decode_steps_between_prefills,
                           usage_context="openai_api_server",
                           enable_prefix_caching=enable_prefix_caching,
                           enforce_eager=enforce_eager, seed=seed, generation_config=generation_config,
                           revision=revision, tokenizer=tokenizer, download_dir=download_dir,
                           trust_remote_code=trust_remote_code, model_impl=model_impl, hf_overrides=hf_overrides,
                           runner=runner, pooler_config=_json_option(pooler_config, "--pooler-config"),
                           structured_outputs_backend=structured_outputs_backend,
                           structured_outputs_config=structured_outputs_config,
                           guided_decoding_backend=guided_decoding_backend,
                           enable_lora=enable_lora or bool(lora_modules) or allow_runtime_lora,
                           max_loras=max_loras, max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras,
                           speculative_config=speculative_config, tensor_parallel_size=tensor_parallel_size,
                           pipeline_parallel_size=pipeline_parallel_size, data_parallel_size=data_parallel_size,
                           enable_expert_parallel=enable_expert_parallel,
                           distributed_executor_backend=distributed_executor_backend,
                           limit_mm_per_prompt=limit_mm_per_prompt)
        engine = load_engine(args)
        try:
            console.print(f"Serving on http://{host}:{port}/v1 (docs at /docs"
                          f"{', console at /' if settings.web_ui else ''})"
                          f"{' - API key required' if settings.api_key else ''}", highlight=False)
            code = run_server(engine, settings, host=host, port=port, log_level=log_level)
        finally:
            engine.shutdown()
        if code:
            raise typer.Exit(code)

    _run(body)


def _sampling(temperature: float | None, top_p: float | None, max_tokens: int, seed: int | None, engine: Any) -> Any:
    base = engine.default_sampling_params()
    changes: dict[str, Any] = {"max_tokens": max_tokens}
    if temperature is not None:
        changes["temperature"] = temperature
    if top_p is not None:
        changes["top_p"] = top_p
    if seed is not None:
        changes["seed"] = seed
    try:
        return base.clone(**changes)
    except ValueError as exc:
        raise UserError(str(exc)) from None


async def _stream(engine: Any, prompt: Any, params: Any) -> str:
    """Print a generation as it arrives; returns the full text."""
    printed = 0
    text = ""
    async for o in engine.generate(prompt, params, f"cli-{uuid.uuid4().hex}"):
        text = o.outputs[0].text
        if len(text) > printed:
            out.print(text[printed:], end="", markup=False, highlight=False, soft_wrap=True)
            printed = len(text)
    out.print()
    return text


@app.command()
def generate(
    model: str | None = typer.Argument(None, help="Model (default: SmolLM2 GGUF)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt to complete."),
    max_tokens: int = typer.Option(128, help="Tokens to generate."),
    temperature: float | None = typer.Option(None, help="Default: the model's generation_config."),
    top_p: float | None = typer.Option(None),
    seed: int | None = typer.Option(None),
    device: str | None = typer.Option(None),
    dtype: str = typer.Option("auto"),
    quantization: str | None = typer.Option(None, "--quantization", "-q", help="As for serve."),
    max_model_len: int | None = typer.Option(None),
) -> None:
    """Complete PROMPT with MODEL, streaming the text to the terminal."""

    def body() -> None:
        if not prompt:
            raise UserError("--prompt must not be empty")
        engine = load_engine(engine_args(resolve_model(model), device=device, dtype=dtype,
                                         quantization=quantization, max_model_len=max_model_len))
        try:
            params = _sampling(temperature, top_p, max_tokens, seed, engine)
            asyncio.run(_stream(engine, prompt, params))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        finally:
            engine.shutdown()

    _run(body)


@app.command()
def chat(
    model: str | None = typer.Argument(None, help="Model (default: SmolLM2 GGUF)."),
    system: str | None = typer.Option(None, help="System prompt."),
    max_tokens: int = typer.Option(256),
    temperature: float | None = typer.Option(None),
    seed: int | None = typer.Option(None),
    device: str | None = typer.Option(None),
    chat_template: str | None = typer.Option(None, help="Chat template file (or template text)."),
) -> None:
    """Chat with MODEL in the terminal (history is kept; /exit or Ctrl-D quits, /reset forgets)."""

    def body() -> None:
        from llmctl_server.chat_template import ChatRenderer, load_template_source
        from llmctl_server.errors import APIError

        try:
            template = load_template_source(chat_template)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        engine = load_engine(engine_args(resolve_model(model), device=device))
        try:
            renderer = ChatRenderer(engine.tokenizer, template)
            if not renderer.available:
                raise UserError("this model has no chat template; pass --chat-template or use `llmctl generate`")
            params = _sampling(temperature, None, max_tokens, seed, engine)
            history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
            console.print("Type a message; /exit to quit, /reset to clear the history.")
            while True:
                try:
                    line = input("> ")
                except EOFError:
                    break
                msg = line.strip()
                if not msg:
                    continue
                if msg in ("/exit", "/quit"):
                    break
                if msg == "/reset":
                    history = history[:1] if system else []
                    continue
                history.append({"role": "user", "content": line})
                try:
                    text, ids = renderer.prompt_ids(history, True)
                except APIError as exc:
                    raise UserError(exc.message) from None
                reply = asyncio.run(_stream(engine, {"prompt_token_ids": ids, "prompt": text}, params))
                history.append({"role": "assistant", "content": reply})
        finally:
            engine.shutdown()

    _run(body)


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """Show plugins, platforms, devices and what `serve` would pick. Exit 0 iff a platform is usable."""
    from llmctl_cli import doctor as doc

    def body() -> None:
        report = doc.collect()
        if as_json:
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        else:
            doc.render(report, out)
        if not report["ok"]:
            raise typer.Exit(1)

    _run(body)


@app.command()
def plugins() -> None:
    """List llmctl plugins and what each registered."""
    from rich.table import Table

    def body() -> None:
        from llmctl.plugins import get_plugin_manager

        pm = get_plugin_manager()
        provides: dict[str, list[str]] = {}
        reg = pm.registry
        for kind, table in (("platform", reg.platforms), ("attention", reg.attention_backends),
                            ("quant", reg.quant_methods), ("comm", reg.communicators), ("model", reg.models)):
            for key, entry in table.items():
                provides.setdefault(entry.plugin, []).append(f"{kind}:{key}")
        for entry in reg.ops:
            provides.setdefault(entry.plugin, []).append(f"op:{entry.item.name}@{entry.item.platform}")
        t = Table(title="llmctl plugins")
        for col in ("name", "distribution", "version", "status", "provides"):
            t.add_column(col)
        for info in pm.plugins.values():
            status = f"broken: {info.error}" if info.broken else ("disabled" if info.disabled else "ok")
            items = provides.get(info.name, [])
            shown = ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
            t.add_row(info.name, info.distribution or "-", info.version or "-", status, shown or "-")
        out.print(t)

    _run(body)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print the table as JSON.")) -> None:
    """List the natively supported architectures, their features and the test that covers each."""
    from rich.markup import escape
    from rich.table import Table

    def body() -> None:
        from dataclasses import asdict

        from llmctl.models.supported import MODELS

        if as_json:
            sys.stdout.write(json.dumps([asdict(m) for m in MODELS], indent=2) + "\n")
            return
        t = Table(title="llmctl native architectures (any other transformers causal LM runs through the fallback)")
        for col in ("architecture", "family", "features", "test"):
            t.add_column(col, overflow="fold")
        for m in MODELS:
            t.add_row(m.architecture, m.family, escape(m.features), escape(m.test))
        out.print(t)

    _run(body)


@app.command()
def version() -> None:
    """Print the versions of the llmctl packages."""
    from importlib import metadata

    for dist in ("llmctl-core", "llmctl-server", "llmctl-cli"):
        try:
            v = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v = "not installed"
        out.print(f"{dist} {v}", highlight=False)


def _mount_bench() -> None:
    """`llmctl bench` lives in core (llmctl.bench) so benchmarks run without the CLI; mounted here, with the HTTP
    load generator `llmctl bench serve`, which lives here beside the HTTP client."""
    from llmctl.bench.cli import bench_app

    from llmctl_cli.bench_serve import serve

    bench_app.command(name="serve")(serve)

    app.add_typer(bench_app, name="bench")


_mount_bench()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
