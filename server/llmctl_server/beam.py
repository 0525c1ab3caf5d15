"""``use_beam_search`` on /v1/completions and /v1/chat/completions, as vLLM's server offers it: ``n`` is the
beam width and the ``n`` best beams come back as the choices. The search itself is llmctl.beam_search, driven
through the engine's ``generate`` (each step's beams run as concurrent one-token requests)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse

from llmctl_server import protocol as p
from llmctl_server.errors import bad_request
from llmctl_server.serving import PreparedPrompt, ServerState, api_error_from


def check_beam_request(body: p.CompletionRequest | p.ChatCompletionRequest) -> None:
    """What beam search here does not support gets a 400 naming the field, before anything runs."""
    from llmctl.beam_search import MAX_BEAM_WIDTH

    if body.stream:
        raise bad_request("stream: not supported with use_beam_search (the beams are only known at the end)",
                          param="stream")
    if body.n > MAX_BEAM_WIDTH:
        raise bad_request(f"n: with use_beam_search n is the beam width, at most {MAX_BEAM_WIDTH}, got {body.n}",
                          param="n")
    if body.temperature:
        raise bad_request("temperature: beam search is deterministic; use 0 or leave it unset", param="temperature")
    if isinstance(body, p.CompletionRequest) and (body.logprobs is not None or body.echo):
        name = "logprobs" if body.logprobs is not None else "echo"
        raise bad_request(f"{name}: not supported with use_beam_search", param=name)
    if isinstance(body, p.ChatCompletionRequest) and body.logprobs:
        raise bad_request("logprobs: not supported with use_beam_search", param="logprobs")


async def beam_search_response(state: ServerState, body: p.CompletionRequest | p.ChatCompletionRequest, model: str,
                               prompts: list[PreparedPrompt], max_tokens: list[int], chat: bool) -> JSONResponse:
    from llmctl.beam_search import BeamSearchParams, async_beam_search

    try:
        params = [BeamSearchParams(beam_width=body.n, max_tokens=mt, ignore_eos=body.ignore_eos,
                                   length_penalty=body.length_penalty) for mt in max_tokens]
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    state.admit()
    request_id = p.new_id("chatcmpl" if chat else "cmpl")
    eos = state.engine.eos_token_ids
    state.in_flight += 1
    try:
        results = await asyncio.gather(*(async_beam_search(state.engine, pp.ids, bp, eos, state.max_model_len,
                                                           f"{request_id}-{i}")
                                         for i, (pp, bp) in enumerate(zip(prompts, params, strict=True))))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise api_error_from(exc) from None
    finally:
        state.in_flight -= 1
    tokenizer = state.engine.tokenizer
    choices: list[Any] = []
    completion_tokens = 0
    for seqs in results:
        for seq in seqs:
            text = tokenizer.decode(seq.output_token_ids, skip_special_tokens=body.skip_special_tokens)
            completion_tokens += len(seq.output_token_ids)
            i = len(choices)
            if chat:
                choices.append(p.ChatChoice(index=i, message=p.ChatResponseMessage(content=text),
                                            finish_reason=seq.finish_reason))
            else:
                choices.append(p.CompletionChoice(index=i, text=text, finish_reason=seq.finish_reason))
    prompt_tokens = sum(len(pp.ids) for pp in prompts)
    usage = p.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens)
    cls = p.ChatCompletionResponse if chat else p.CompletionResponse
    return JSONResponse(cls(id=request_id, created=p.now(), model=model, choices=choices, usage=usage).model_dump())

