"""The pooling endpoints: ``POST /v1/embeddings`` (OpenAI), ``POST /score`` (vLLM; also ``/v1/score``),
``POST /rerank`` (Jina / Cohere; also ``/v1/rerank`` and ``/v2/rerank``) and ``POST /classify`` (vLLM).

Each input becomes one pooling request through ``AsyncLLM.encode``; the inputs of one HTTP request run
concurrently in a task group, so one bad input cancels (and aborts in the engine) the others. Scores come from
a cross-encoder (one pass per query/document pair, with segment ids) or, for an embedding model, from the cosine
similarity of the two embeddings.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from llmctl_server import pooling_protocol as pp
from llmctl_server import protocol as p
from llmctl_server.engine_client import EngineClient
from llmctl_server.errors import bad_request
from llmctl_server.serving import ServerState, api_error_from


def model_tasks(engine: EngineClient) -> list[str]:
    """What ``/v1/models`` reports a model serves: ``generate``, or the pooling tasks of its pooler."""
    front = engine.pooling
    if front is None:
        return ["generate"]
    tasks = [t for t in front.tasks if t != "encode"]
    if front.num_labels is not None and front.num_labels != 1:
        tasks = [t for t in tasks if t != "score"]
    if "score" in tasks:
        tasks.append("rerank")
    return tasks


def _front(state: ServerState, task: str) -> Any:
    front = state.engine.pooling
    if front is None:
        raise bad_request(f"model: this server runs a text-generation model; {task} needs a pooling model "
                          f"(llmctl serve --runner pooling)", param="model")
    if task not in model_tasks(state.engine):
        raise bad_request(f"model: this model serves {', '.join(model_tasks(state.engine))}, not {task}",
                          param="model")
    return front


async def _encode_all(state: ServerState, prompts: list[Any], params: list[Any], prefix: str) -> list[Any]:
    """Run every input through the engine; admission and in-flight accounting as for generation."""
    from llmctl.pooling.outputs import PoolingRequestOutput

    if len(prompts) > pp.MAX_INPUTS:
        raise bad_request(f"input: at most {pp.MAX_INPUTS} inputs per request, got {len(prompts)}", param="input")
    state.admit()
    state.in_flight += 1
    request_id = p.new_id(prefix)

    async def one(i: int) -> PoolingRequestOutput:
        async for out in state.engine.encode(prompts[i], params[i], f"{request_id}-{i}"):
            return out
        raise RuntimeError("the engine returned no output")

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(i)) for i in range(len(prompts))]
    except* BaseException as eg:
        first = eg.exceptions[0]
        if isinstance(first, asyncio.CancelledError):
            raise first from None
        raise api_error_from(first) from None
    finally:
        state.in_flight -= 1
    return [t.result() for t in tasks]


def _pooling_params(**kw: Any) -> Any:
    from llmctl.pooling.params import PoolingParams

    try:
        return PoolingParams(**kw)
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def _check_text(text: Any, field: str) -> None:
    if isinstance(text, str) and not text:
        raise bad_request(f"{field}: must not be empty", param=field)


async def _scores(state: ServerState, queries: list[str], docs: list[str], truncate: int | None,
                  use_activation: bool | None) -> tuple[list[float], int]:
    """(score per pair, prompt tokens used)."""
    front = _front(state, "score")
    for q in queries:
        _check_text(q, "query")
    for d in docs:
        _check_text(d, "documents")
    if front.num_labels is not None:  # cross-encoder
        from llmctl.entrypoints.pooling import pair_prompt

        try:
            prompts = [pair_prompt(state.engine, q, d, truncate) for q, d in zip(queries, docs, strict=True)]
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        params = [_pooling_params(task="score", truncate_prompt_tokens=truncate, use_activation=use_activation)
                  ] * len(prompts)
        outs = await _encode_all(state, prompts, params, "score")
        return [float(o.outputs.data.reshape(-1)[0]) for o in outs], sum(len(o.prompt_token_ids) for o in outs)
    unique = list(dict.fromkeys(queries + docs))
    params = [_pooling_params(task="embed", truncate_prompt_tokens=truncate)] * len(unique)
    outs = await _encode_all(state, unique, params, "score")
    vec = {text: o.outputs.data.float() for text, o in zip(unique, outs, strict=True)}
    scores = [float(torch.nn.functional.cosine_similarity(vec[q], vec[d], dim=0)) for q, d in zip(queries, docs,
                                                                                                   strict=True)]
    return scores, sum(len(o.prompt_token_ids) for o in outs)


def _message_prompt(state: ServerState, front: Any, messages: list[pp.EmbeddingMessage]) -> Any:
    """vLLM's chat-style embedding input: the one text or the one image (a data: URL) the messages hold."""
    from llmctl_server.media import load_image

    texts: list[str] = []
    images: list[str] = []
    for m in messages:
        if isinstance(m.content, str):
            texts.append(m.content)
            continue
        for part in m.content:
            if part.type == "text" and part.text is not None:
                texts.append(part.text)
            elif part.type == "image_url" and part.image_url is not None:
                images.append(part.image_url.url)
            else:
                raise bad_request(f"messages: a {part.type} part needs its {part.type} field", param="messages")
    if len(images) > 1:
        raise bad_request(f"messages: at most 1 image per embedding request, got {len(images)}", param="messages")
    if images and texts:
        raise bad_request("messages: an embedding request is one image or one text, not both", param="messages")
    if images:
        if front.image_processor_dir is None:
            raise bad_request("messages: this model does not take images", param="messages")
        s = state.settings
        return {"multi_modal_data": {"image": load_image(images[0], "messages.image_url", s.max_image_bytes,
                                                         s.max_image_pixels)}}
    if not texts or not "".join(texts):
        raise bad_request("messages: no text or image to embed", param="messages")
    return "\n".join(texts)


def register_pooling_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/embeddings", response_model=pp.EmbeddingResponse)
    async def embeddings(body: pp.EmbeddingRequest) -> JSONResponse:
        model = state.check_model(body.model)
        front = _front(state, "embed")
        if (body.input is None) == (body.messages is None):
            raise bad_request("input: give either input or messages", param="input")
        inputs = body.inputs()
        if body.messages is None and not inputs:
            raise bad_request("input: must not be empty", param="input")
        prompts: list[Any] = []
        if body.messages is not None:  # decoding an image is CPU work: off the event loop
            prompts.append(await asyncio.to_thread(_message_prompt, state, front, body.messages))
        for x in inputs:
            _check_text(x, "input")
            if isinstance(x, list):
                if not x:
                    raise bad_request("input: a tokenized input must not be empty", param="input")
                p.check_token_ids(x, state.vocab_size, "input")
                prompts.append({"prompt_token_ids": x})
            elif body.add_special_tokens:
                prompts.append(x)
            else:
                ids = list(state.engine.tokenizer(x, add_special_tokens=False)["input_ids"])
                prompts.append({"prompt_token_ids": ids, "prompt": x})
        params = _pooling_params(task="embed", dimensions=body.dimensions, normalize=body.normalize,
                                 truncate_prompt_tokens=body.truncate_prompt_tokens)
        outs = await _encode_all(state, prompts, [params] * len(prompts), "embd")
        data = []
        for i, o in enumerate(outs):
            vec = o.outputs.data.float()
            emb: list[float] | str = (base64.b64encode(vec.numpy().astype("<f4").tobytes()).decode("ascii")
                                      if body.encoding_format == "base64" else vec.tolist())
            data.append(pp.EmbeddingData(index=i, embedding=emb))
        tokens = sum(len(o.prompt_token_ids) for o in outs)
        return JSONResponse(pp.EmbeddingResponse(id=p.new_id("embd"), model=model, data=data,
                                                 usage=pp.PoolingUsage(prompt_tokens=tokens,
                                                                       total_tokens=tokens)).model_dump())

    async def score(body: pp.ScoreRequest) -> JSONResponse:
        model = state.check_model(body.model)
        first = [body.text_1] if isinstance(body.text_1, str) else list(body.text_1)
        second = [body.text_2] if isinstance(body.text_2, str) else list(body.text_2)
        if not first or not second:
            raise bad_request("text_1: text_1 and text_2 must not be empty", param="text_1")
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            raise bad_request(f"text_1: got {len(first)} texts for {len(second)} in text_2; give one, or one per "
                              f"text", param="text_1")
        scores, tokens = await _scores(state, first, second, body.truncate_prompt_tokens, body.use_activation)
        return JSONResponse(pp.ScoreResponse(
            id=p.new_id("score"), model=model, data=[pp.ScoreData(index=i, score=s) for i, s in enumerate(scores)],
            usage=pp.PoolingUsage(prompt_tokens=tokens, total_tokens=tokens)).model_dump())

    async def rerank(body: pp.RerankRequest) -> JSONResponse:
        model = state.check_model(body.model)
        docs = body.texts()
        if not docs:
            raise bad_request("documents: must not be empty", param="documents")
        scores, tokens = await _scores(state, [body.query] * len(docs), docs, body.truncate_prompt_tokens, None)
        order = sorted(range(len(docs)), key=lambda i: -scores[i])
        if body.top_n:
            order = order[: body.top_n]
        results = [pp.RerankResult(index=i, relevance_score=scores[i],
                                   document={"text": docs[i]} if body.return_documents else None) for i in order]
        return JSONResponse(pp.RerankResponse(id=p.new_id("rerank"), model=model,
                                              usage=pp.RerankUsage(total_tokens=tokens), results=results).model_dump())

    @app.post("/classify", response_model=pp.ClassificationResponse)
    async def classify(body: pp.ClassificationRequest) -> JSONResponse:
        model = state.check_model(body.model)
        _front(state, "classify")
        texts = body.inputs()
        if not texts:
            raise bad_request("input: must not be empty", param="input")
        for t in texts:
            _check_text(t, "input")
        params = _pooling_params(task="classify", truncate_prompt_tokens=body.truncate_prompt_tokens)
        outs = await _encode_all(state, texts, [params] * len(texts), "classify")
        id2label = getattr(state.engine.model_config.hf_config, "id2label", None) or {}
        data = []
        for i, o in enumerate(outs):
            probs = o.outputs.data.float().reshape(-1).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            label = id2label.get(best, id2label.get(str(best)))
            data.append(pp.ClassificationData(index=i, label=None if label is None else str(label), probs=probs,
                                              num_classes=len(probs)))
        tokens = sum(len(o.prompt_token_ids) for o in outs)
        return JSONResponse(pp.ClassificationResponse(
            id=p.new_id("classify"), model=model, data=data,
            usage=pp.PoolingUsage(prompt_tokens=tokens, total_tokens=tokens)).model_dump())

    for path in ("/score", "/v1/score"):
        app.post(path, response_model=pp.ScoreResponse)(score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.post(path, response_model=pp.RerankResponse)(rerank)

