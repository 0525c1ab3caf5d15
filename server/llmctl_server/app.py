"""``build_app(engine, settings)``: the FastAPI app with the OpenAI routes, health, metrics and tokenizer routes.

The app does not own the engine: whoever built the engine (``llmctl serve``, a test fixture) shuts it down.
The app owns a watchdog that notices a dead engine loop, fails in-flight requests and calls
``app.state.on_engine_dead`` (the launcher uses it to exit non-zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmctl_server import protocol as p
from llmctl_server.beam import beam_search_response, check_beam_request
from llmctl_server.chat_images import check_images, expand_placeholders, load_images
from llmctl_server.chat_request import ChatPlan, plan_chat, template_messages
from llmctl_server.chat_template import ChatRenderer
from llmctl_server.engine_client import EngineClient
from llmctl_server.errors import APIError, bad_request, error_response, unavailable
from llmctl_server.lora_routes import LoRAModule, LoRARegistry, register_lora_routes
from llmctl_server.metrics import Metrics
from llmctl_server.middleware import ASGIApp, AuthMiddleware, BodyLimitMiddleware, Message, Receive, Scope, Send
from llmctl_server.pooling_routes import model_tasks, register_pooling_routes
from llmctl_server.prompt_text import check_length, check_unicode, encode, max_prompt_chars, off_loop
from llmctl_server.reasoning import get_reasoning_parser
from llmctl_server.responses import add_responses_route
from llmctl_server.serving import (
    Choice,
    PreparedPrompt,
    Recorder,
    Run,
    ServerState,
    _chain,
    api_error_from,
    chat_logprobs,
    check_prompt_logprobs,
    completion_logprobs,
    first_event,
    make_sampling_params,
    prompt_logprobs_entries,
    resolve_max_tokens,
    sse,
    stream_with_errors,
)
from llmctl_server.settings import ServerSettings
from llmctl_server.streaming import GuardedStreamingResponse
from llmctl_server.structured import structured_params
from llmctl_server.tokens import TokenText
from llmctl_server.web_ui import WEB_UI_PATHS, mount_web_ui
from llmctl_server.worker_threads import start_worker_threads

logger = logging.getLogger("llmctl_server")


class StatusMetricsMiddleware:
    """Counts responses by matched route template and status (templates, not raw paths: bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(route=path, status=str(status)).inc()


def _engine_limits(engine: EngineClient) -> tuple[int, int, int | None, str]:
    mc = engine.model_config
    name = mc.served_model_name or mc.model
    return int(mc.max_model_len), int(mc.vocab_size), engine.args.max_num_seqs, name


def _warm_tokenizer(tokenizer: Any) -> Callable[[], object] | None:
    """One short encode and decode: what a worker thread's first request would do first."""
    if tokenizer is None:
        return None

    def warm() -> object:
        return tokenizer.decode(tokenizer.encode("Hello, world"))

    return warm


def build_app(engine: EngineClient, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    max_model_len, vocab_size, max_num_seqs, default_name = _engine_limits(engine)
    tokenizer = engine.tokenizer
    model_names = list(settings.served_model_names) or [default_name]
    metrics = Metrics(engine.get_stats, model_names[0], settings.metrics_prefix)
    state = ServerState(
        engine=engine, settings=settings, metrics=metrics,
        renderer=ChatRenderer(tokenizer, settings.chat_template), token_text=TokenText(tokenizer),
        model_names=model_names, max_model_len=max_model_len,
        vocab_size=vocab_size, max_num_seqs=max_num_seqs,
    )
    state.max_prompt_chars = max_prompt_chars(tokenizer, max_model_len)
    media = settings.media_connector()
    state.loras = _start_loras(engine, settings, model_names[0])
    if settings.otlp_traces_endpoint:
        from llmctl_server.tracing import RequestTracer

        state.tracer = RequestTracer.to_endpoint(settings.otlp_traces_endpoint)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start_worker_threads(asyncio.get_running_loop(), _warm_tokenizer(tokenizer))
        task = asyncio.create_task(_watchdog(app, state))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    from llmctl_server import __version__

    app = FastAPI(title="llmctl OpenAI-compatible server", version=__version__, lifespan=lifespan)
    app.state.llmctl = state
    app.state.on_engine_dead = None

    for exc_type in (RequestValidationError, StarletteHTTPException, APIError, ValueError, Exception):
        app.add_exception_handler(exc_type, _handle)

    app.add_middleware(AuthMiddleware, router=app.router, api_key=settings.api_key,
                       public=settings.public_paths | ({"/metrics"} if settings.metrics_public else frozenset())
                       | (WEB_UI_PATHS if settings.web_ui else frozenset()))
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(StatusMetricsMiddleware, metrics=metrics)

    # -- plain routes ------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return error_response(unavailable("the server is shutting down"))
        if not state.engine_alive():
            return error_response(unavailable("the inference engine is not running"))
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        import llmctl

        return {"version": __version__, "llmctl_core": getattr(llmctl, "__version__", "unknown")}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models() -> p.ModelList:
        root = settings.model_root or engine.model_config.model
        tasks = model_tasks(engine)
        cards = [p.ModelCard(id=name, created=p.now(), root=root, max_model_len=max_model_len, tasks=tasks)
                 for name in state.model_names]
        cards += [p.ModelCard(id=name, created=p.now(), root=req.lora_path, parent=state.loras.parents.get(name),
                              max_model_len=max_model_len, tasks=tasks) for name, req in state.loras.adapters.items()]
        return p.ModelList(data=cards)

    @app.post("/tokenize", response_model=p.TokenizeResponse)
    async def tokenize(body: p.TokenizeRequest) -> p.TokenizeResponse:
        state.check_model(body.model)
        if body.messages is not None:
            _, ids = await _render_chat(state, template_messages(body.messages), body.add_generation_prompt, None)
        else:
            ids = await encode(tokenizer, body.prompt or "", "prompt", state.max_prompt_chars,
                               body.add_special_tokens)
        return p.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=max_model_len)

    @app.post("/detokenize", response_model=p.DetokenizeResponse)
    async def detokenize(body: p.DetokenizeRequest) -> p.DetokenizeResponse:
        state.check_model(body.model)
        p.check_token_ids(body.tokens, vocab_size, "tokens")
        return p.DetokenizeResponse(prompt=await off_loop(tokenizer.decode, body.tokens))

    register_pooling_routes(app, state)  # /v1/embeddings, /score, /rerank
    if settings.allow_runtime_lora:
        register_lora_routes(app, state, settings.lora_root or "")

    if settings.web_ui:
        mount_web_ui(app)

    # -- generation ----------------------------------------------------------------------------------------------
    reasoning_end_ids = None
    if settings.reasoning_parser:  # structured output starts after the reasoning
        reasoning_end_ids = list(tokenizer.encode(get_reasoning_parser(settings.reasoning_parser).end,
                                                  add_special_tokens=False))

    @app.post("/v1/completions", response_model=p.CompletionResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        model = state.check_model(body.model)
        p.check_limits(body, max_n=settings.max_n, max_model_len=max_model_len, vocab_size=vocab_size)
        check_prompt_logprobs(body)
        prompts: list[PreparedPrompt] = []
        raws = body.prompts()
        for i, raw in enumerate(raws):
            field_name = "prompt" if len(raws) == 1 else f"prompt[{i}]"
            if isinstance(raw, str):
                if not raw:
                    raise bad_request(f"{field_name}: must not be empty", param=field_name)
                check_length(len(raw), state.max_prompt_chars, field_name)
        for i, raw in enumerate(raws):
            field_name = "prompt" if len(raws) == 1 else f"prompt[{i}]"
            if isinstance(raw, str):
                prompts.append(PreparedPrompt(raw, await encode(tokenizer, raw, field_name, state.max_prompt_chars)))
            else:
                prompts.append(PreparedPrompt(await off_loop(tokenizer.decode, raw), list(raw)))
        structured = structured_params(body)
        if body.use_beam_search:
            if state.lora_request(model) is not None:
                raise bad_request("use_beam_search: not supported with a LoRA adapter", param="use_beam_search")
            check_beam_request(body)
            max_tokens = [resolve_max_tokens(state, len(pp.ids), body.max_tokens, "max_tokens") for pp in prompts]
            return await beam_search_response(state, body, model, prompts, max_tokens, chat=False)
        params = []
        for pp in prompts:
            mt = resolve_max_tokens(state, len(pp.ids), body.max_tokens, "max_tokens")
            sp = make_sampling_params(state, body, mt, body.logprobs, _extra_args(request, body))
            if structured is not None:
                sp = sp.clone(structured_outputs=structured)
            if body.echo and body.logprobs is not None and sp.prompt_logprobs is None:
                sp = sp.clone(prompt_logprobs=body.logprobs)
            params.append(sp)
        return await _generate(state, request, body, model, prompts, params, chat=False)

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        model = state.check_model(body.model)
        p.check_limits(body, max_n=settings.max_n, max_model_len=max_model_len, vocab_size=vocab_size)
        check_prompt_logprobs(body)
        mm = getattr(state.engine, "multimodal", None)
        plan = plan_chat(body, settings, reasoning_end_ids, getattr(mm, "chat_image_separator", "\n"))
        images = check_images(state.engine, plan.images)  # before any rendering or fetching
        text, ids = await _render_chat(state, plan.messages, body.add_generation_prompt, body.chat_template_kwargs,
                                       plan.tools, plan.image_marker)
        name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if body.use_beam_search and images:
            raise bad_request("use_beam_search: not supported with images", param="use_beam_search")
        loaded = await load_images(media, images) if images else []
        mm_data = {"image": loaded} if loaded else None
        ids = expand_placeholders(state.engine, ids, loaded)
        mt = resolve_max_tokens(state, len(ids), body.max_new_tokens(), name)
        if body.use_beam_search:
            if state.lora_request(model) is not None:
                raise bad_request("use_beam_search: not supported with a LoRA adapter", param="use_beam_search")
            check_beam_request(body)
            return await beam_search_response(state, body, model, [PreparedPrompt(text, ids)], [mt], chat=True)
        k = (body.top_logprobs or 0) if body.logprobs else None
        sp = make_sampling_params(state, body, mt, k, _extra_args(request, body))
        if plan.structured is not None:
            sp = sp.clone(structured_outputs=plan.structured)
        return await _generate(state, request, body, model, [PreparedPrompt(text, ids, mm_data)], [sp], chat=True,
                               plan=plan)

    add_responses_route(app, state, chat_completions)
    return app


def _start_loras(engine: EngineClient, settings: ServerSettings, base_name: str) -> LoRARegistry:
    """The adapters of ``--lora-modules``, each read and checked now: a bad one stops the start-up with its reason."""
    registry = LoRARegistry(base_name)
    for text in settings.lora_modules:
        module = LoRAModule.parse(text)
        if module.name in registry.adapters or module.name == base_name:
            raise ValueError(f"--lora-modules: the name {module.name!r} is used twice")
        if module.base_model_name is not None and module.base_model_name != base_name:
            raise ValueError(f"--lora-modules: adapter {module.name!r} names base model {module.base_model_name!r}, "
                             f"but this server serves {base_name!r}")
        req = registry.new_request(module.name, module.path)
        engine.load_lora(req)
        registry.adapters[module.name] = req
        registry.parents[module.name] = base_name
    return registry


def _extra_args(request: Request, body: p.SamplingFields) -> dict[str, Any] | None:
    """vLLM's ``vllm_xargs``/``extra_args`` passthrough (used e.g. by the engine's test-only fault seam)."""
    merged = {**(body.vllm_xargs or {}), **(body.extra_args or {})}
    return merged or None


async def _render_chat(state: ServerState, msgs: list[dict[str, Any]], add_generation_prompt: bool,
                       kwargs: dict[str, Any] | None, tools: list[dict[str, Any]] | None = None,
                       image_marker: str | None = None) -> tuple[str, list[int]]:
    if tools is not None:
        kwargs = {**(kwargs or {}), "tools": tools}
    check_length(sum(len(m["content"]) for m in msgs if isinstance(m.get("content"), str)), state.max_prompt_chars,
                 "messages")

    def render() -> tuple[str, list[int]]:
        for i, msg in enumerate(msgs):
            for key, value in msg.items():
                if isinstance(value, str):
                    check_unicode(value, f"messages[{i}].{key}")
                elif value is not None:
                    check_unicode(json.dumps(value, ensure_ascii=False, default=str), f"messages[{i}].{key}")
        if kwargs:
            check_unicode(json.dumps(kwargs, ensure_ascii=False, default=str), "chat_template_kwargs")
        if image_marker is None:
            return state.renderer.prompt_ids(msgs, add_generation_prompt, kwargs)
        mm = state.engine.multimodal
        return state.renderer.prompt_ids(msgs, add_generation_prompt, kwargs, image_marker, mm.image_prompt_ids(),
                                         mm.image_prompt_text())

    text, ids = await asyncio.to_thread(render)
    if not ids:
        raise bad_request("messages: the chat template produced an empty prompt", param="messages")
    return text, ids


async def _handle(request: Request, exc: Exception) -> Response:
    return error_response(exc)


async def _watchdog(app: FastAPI, state: ServerState) -> None:
    """Poll the engine; when its loop dies, fail in-flight requests and tell the launcher."""
    while True:
        await asyncio.sleep(state.settings.engine_poll_interval)
        if state.draining:
            continue
        if not state.engine_alive():
            state.mark_engine_dead()
            await asyncio.sleep(state.settings.engine_dead_linger)
            callback = app.state.on_engine_dead
            if callback is not None:
                try:
                    callback()
                except Exception:
                    logger.exception("on_engine_dead callback failed")
            return


async def _generate(state: ServerState, request: Request, body: p.CompletionRequest | p.ChatCompletionRequest,
                    model: str, prompts: list[PreparedPrompt], params: list[Any], chat: bool,
                    plan: ChatPlan | None = None) -> Response:
    state.admit()
    request_id = p.new_id("chatcmpl" if chat else "cmpl")
    run = Run(state, request, request_id, state.lora_request(model))
    recorder = Recorder(state.metrics, run.arrival)
    run.start(prompts, params)
    try:
        rest, first = await first_event(run)
    except BaseException as exc:
        await run.close()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise api_error_from(exc) from None
    n = body.n
    choices = [Choice() for _ in range(len(prompts) * n)]
    created = p.now()
    tt = state.token_text
    events = _chain(first, rest)
    outs = [plan.choice_output() for _ in choices] if plan is not None and plan.active else None

    def apply(idx: int, out: Any) -> list[int]:
        """Update choices from a cumulative output; returns the choice indexes that changed."""
        changed = []
        for o in out.outputs:
            ci = idx * n + o.index
            c = choices[ci]
            c.text, c.token_ids, c.logprobs = o.text, list(o.token_ids), o.logprobs
            if o.finish_reason is not None:
                c.finish_reason, c.stop_reason = o.finish_reason, o.stop_reason
            recorder.observe((idx, o.index), len(o.token_ids))
            changed.append(ci)
        return changed

    prompt_outs: dict[int, Any] = {}

    def usage() -> p.UsageInfo:
        pt = sum(len(pp.ids) for pp in prompts) * 1
        ct = sum(len(c.token_ids) for c in choices)
        return p.UsageInfo(prompt_tokens=pt, completion_tokens=ct, total_tokens=pt + ct)

    def finish_metrics() -> None:
        finals = list(prompt_outs.values())
        recorder.finish(sum(len(pp.ids) for pp in prompts), [c.finish_reason for c in choices], finals)
        if state.tracer is not None:
            state.tracer.request_done(request_id, model, request.headers, params, finals, recorder)

    if not body.stream:
        try:
            async for idx, out in events:
                prompt_outs[idx] = out
                apply(idx, out)
        except BaseException as exc:
            await run.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise api_error_from(exc) from None
        await run.close()
        finish_metrics()

        def respond() -> JSONResponse:
            if chat:
                assert isinstance(body, p.ChatCompletionRequest)
                k = body.top_logprobs or 0
                plp = prompt_logprobs_entries(tt, getattr(prompt_outs.get(0), "prompt_logprobs", None),
                                              len(prompts[0].ids)) if body.prompt_logprobs is not None else None
                chat_choices = []
                for i, c in enumerate(choices):
                    message, finish = p.ChatResponseMessage(content=c.text), c.finish_reason
                    if outs is not None:
                        msg = outs[i].final(c.text)
                        ids = outs[i].ids(len(msg.calls))
                        message = p.ChatResponseMessage(
                            content=msg.content, reasoning_content=msg.reasoning,
                            tool_calls=[p.ResponseToolCall(id=ids[j], function=p.ResponseFunctionCall(
                                name=call.name, arguments=call.arguments)) for j, call in enumerate(msg.calls)])
                        finish = outs[i].finish_reason(msg.calls, finish)
                    chat_choices.append(p.ChatChoice(index=i, message=message, finish_reason=finish,
                                                     logprobs=chat_logprobs(tt, c.token_ids, c.logprobs or [], k)
                                                     if body.logprobs else None, stop_reason=c.stop_reason))
                return JSONResponse(p.ChatCompletionResponse(
                    id=request_id, created=created, model=model, usage=usage(), prompt_logprobs=plp,
                    choices=chat_choices).model_dump())
            assert isinstance(body, p.CompletionRequest)
            out_choices = []
            for i, c in enumerate(choices):
                pp = prompts[i // n]
                text = (pp.text + c.text) if body.echo else c.text
                lp = None
                if body.logprobs is not None:
                    ids, positions = list(c.token_ids), list(c.logprobs or [])
                    offset = 0
                    if body.echo:
                        po = prompt_outs.get(i // n)
                        plp = list(getattr(po, "prompt_logprobs", None) or [])
                        plp = plp + [None] * (len(pp.ids) - len(plp))
                        ids, positions = list(pp.ids) + ids, plp[: len(pp.ids)] + positions
                    lp = completion_logprobs(tt, ids, positions, body.logprobs, offset)
                plp = prompt_logprobs_entries(tt, getattr(prompt_outs.get(i // n), "prompt_logprobs", None),
                                              len(pp.ids)) if body.prompt_logprobs is not None else None
                out_choices.append(p.CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=c.finish_reason,
                                                      stop_reason=c.stop_reason, prompt_logprobs=plp))
            return JSONResponse(p.CompletionResponse(id=request_id, created=created, model=model, choices=out_choices,
                                                     usage=usage()).model_dump())

        # Tokens, logprobs and the JSON of a large answer (n=16 with logprobs is thousands of entries) are built
        # in a worker thread: on the event loop they held every other stream's next chunk for as long.
        if n > 1 or body.logprobs or getattr(body, "prompt_logprobs", None) is not None:
            return await asyncio.to_thread(respond)
        return respond()

    include_usage = body.include_usage()

    async def chunks() -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice_list: list[dict[str, Any]], with_usage: p.UsageInfo | None = None) -> str:
            data: dict[str, Any] = {"id": request_id, "object": obj, "created": created, "model": model,
                                    "choices": choice_list}
            if include_usage:
                data["usage"] = with_usage.model_dump() if with_usage is not None else None
            return sse(data)

        if chat:
            for i in range(len(choices)):
                choices[i].started = True
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        async for idx, out in events:
            prompt_outs[idx] = out
            for ci in apply(idx, out):
                c = choices[ci]
                if c.done:
                    continue
                delta = c.text[c.sent_chars:] if len(c.text) > c.sent_chars else ""
                finished = c.finish_reason is not None
                if not delta and not finished:
                    continue  # tokens whose text is held back (incomplete character, possible stop string)
                new_ids = c.token_ids[c.sent_tokens:]
                new_lps = (c.logprobs or [])[c.sent_tokens:]
                entry: dict[str, Any] = {"index": ci, "finish_reason": c.finish_reason if finished else None}
                if chat and outs is not None:  # reasoning / tool calls: the parser decides what the delta is
                    message, calls = outs[ci].delta(c.text, finished)
                    if not message and not finished:
                        continue
                    entry["delta"] = message
                    entry["finish_reason"] = outs[ci].finish_reason(calls, c.finish_reason) if finished else None
                    entry["logprobs"] = chat_logprobs(tt, new_ids, new_lps, body.top_logprobs or 0).model_dump() \
                        if getattr(body, "logprobs", False) else None
                elif chat:
                    assert isinstance(body, p.ChatCompletionRequest)
                    entry["delta"] = {"content": delta} if delta else {}
                    entry["logprobs"] = chat_logprobs(tt, new_ids, new_lps, body.top_logprobs or 0).model_dump() \
                        if body.logprobs else None
                else:
                    assert isinstance(body, p.CompletionRequest)
                    text = delta
                    if body.echo and not c.started:
                        text = prompts[ci // n].text + delta
                    entry["text"] = text
                    entry["logprobs"] = completion_logprobs(tt, new_ids, new_lps, body.logprobs,
                                                            c.sent_chars).model_dump() \
                        if body.logprobs is not None else None
                    entry["stop_reason"] = c.stop_reason if finished else None
                c.started = True
                c.sent_chars += len(delta)
                c.sent_tokens = len(c.token_ids)
                c.done = finished
                yield chunk([entry])
        finish_metrics()
        if include_usage:
            yield chunk([], usage())

    return GuardedStreamingResponse(stream_with_errors(chunks(), run), media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                    write_timeout=state.settings.stream_write_timeout, on_stalled=run.close,
                                    request_id=request_id)
