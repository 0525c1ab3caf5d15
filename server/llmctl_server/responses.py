"""``POST /v1/responses``: OpenAI's Responses API on top of the chat path.

A Responses request becomes a chat request (input items -> messages, flat function tools -> chat tools,
``text.format`` -> ``response_format``), runs through the same code as ``/v1/chat/completions`` (template,
structured output, tool-call and reasoning parsers, admission, disconnect handling), and the answer is rewritten
as output items, or, streamed, as Responses events. Stored responses (``store`` / ``previous_response_id``) are
kept only when the server is started with ``--responses-store-size N``, and then at most N of them (oldest
dropped first).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field

from llmctl_server import protocol as p
from llmctl_server.errors import APIError, bad_request


class InputText(p._Model):
    type: Literal["input_text", "output_text", "text"] = "input_text"
    text: p.SStr


class InputImage(p._Model):
    """An image part: ``image_url`` is a URL as in chat's ``image_url`` parts (same media policy)."""

    type: Literal["input_image"]
    image_url: p.SStr
    detail: Literal["auto", "low", "high"] | None = None


InputPart = Annotated[InputText | InputImage, Field(discriminator="type")]


class InputItem(p._Model):
    """A message, a function call the model made earlier, or that call's output."""

    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: p.SStr | list[InputPart] | None = None
    call_id: p.SStr | None = None
    name: p.SStr | None = None
    arguments: p.SStr | None = None
    output: p.SStr | None = None


class FunctionTool(p._Model):
    type: Literal["function"] = "function"
    name: p.SStr = Field(min_length=1, max_length=256)
    description: p.SStr | None = None
    parameters: dict[str, Any] | None = None
    strict: p.SBool | None = None


class NamedFunctionChoice(p._Model):
    type: Literal["function"] = "function"
    name: p.SStr


class TextFormat(p._Model):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: p.SStr = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: p.SStr | None = None
    strict: p.SBool | None = None


class TextConfig(p._Model):
    format: TextFormat | None = None


class ResponsesRequest(p._Model):
    model: p.SStr | None = None
    input: p.SStr | list[InputItem]
    instructions: p.SStr | None = None
    max_output_tokens: p.SInt | None = Field(None, ge=1)
    temperature: p.SFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: p.SFloat | None = Field(None, gt=0.0, le=1.0)
    seed: p.SInt | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: p.SBool | None = None
    text: TextConfig | None = None
    stream: p.SBool = False
    store: p.SBool | None = None
    previous_response_id: p.SStr | None = None
    guided_decoding_backend: p.SStr | None = None  # vLLM's extension: the grammar engine for text.format and tools


class ResponsesStore:
    """Finished responses and the conversation that led to them, for ``previous_response_id``; bounded."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[response["id"]] = (response, messages)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        with self._lock:
            return self._items.get(response_id)


def _text(content: str | list[InputText | InputImage] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else \
        "\n".join(part.text for part in content if isinstance(part, InputText))


def _content(content: str | list[InputText | InputImage] | None) -> str | list[dict[str, Any]]:
    """Chat content: a string, or chat's parts when the message holds images."""
    if not isinstance(content, list) or not any(isinstance(part, InputImage) for part in content):
        return _text(content)
    return [{"type": "image_url", "image_url": {"url": part.image_url}} if isinstance(part, InputImage)
            else {"type": "text", "text": part.text} for part in content]


def to_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """Input items -> chat messages (without instructions or history)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(body.input):
        if item.type == "message":
            messages.append({"role": item.role or "user", "content": _content(item.content)})
        elif item.type == "function_call":
            if not item.name or item.call_id is None:
                raise bad_request(f"input[{i}]: a function_call needs name and call_id", param=f"input[{i}]")
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments or "{}"}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)  # parallel calls share one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            if item.call_id is None:
                raise bad_request(f"input[{i}]: a function_call_output needs call_id", param=f"input[{i}]")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output or ""})
    if not messages:
        raise bad_request("input: must not be empty", param="input")
    return messages


def to_chat(body: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The equivalent chat request body, and the conversation (history + this input) to store."""
    convo = history + to_messages(body)
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + convo
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream}
    if body.stream:
        chat["stream_options"] = {"include_usage": True}
    for src, dst in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                     ("seed", "seed"), ("parallel_tool_calls", "parallel_tool_calls"),
                     ("guided_decoding_backend", "guided_decoding_backend")):
        value = getattr(body, src)
        if value is not None:
            chat[dst] = value
    if body.tools:
        chat["tools"] = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                         for t in body.tools]
    if isinstance(body.tool_choice, NamedFunctionChoice):
        chat["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    elif body.tool_choice is not None:
        chat["tool_choice"] = body.tool_choice
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name, "schema": fmt.schema_ if fmt.schema_ is not None else {}, "strict": fmt.strict}}
    return chat, convo


def _rid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """Builds the response object and its output items (for the JSON answer and for the stream's events)."""

    def __init__(self, body: ResponsesRequest, model: str, store: bool) -> None:
        self.body = body
        self.id = _rid("resp")
        self.created = p.now()
        self.model = model
        self.store = store

    def envelope(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                 incomplete: str | None = None) -> dict[str, Any]:
        b = self.body
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else \
            {"type": "text"}
        tool_choice: Any = b.tool_choice.model_dump() if isinstance(b.tool_choice, NamedFunctionChoice) else \
            (b.tool_choice or "auto")
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "background": False, "error": None,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": b.previous_response_id, "reasoning": None, "store": self.store,
            "temperature": b.temperature, "text": {"format": fmt}, "tool_choice": tool_choice,
            "tools": [t.model_dump(exclude_none=True) for t in b.tools or []], "top_p": b.top_p,
            "truncation": "disabled", "usage": usage, "metadata": {},
        }


def _usage(chat_usage: dict[str, Any] | None, reasoning_tokens: int = 0) -> dict[str, Any] | None:
    if not chat_usage:
        return None
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": chat_usage["total_tokens"]}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text or
            status == "completed" else []}


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": "completed"}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def output_items(message: dict[str, Any]) -> list[dict[str, Any]]:
    items = []
    if message.get("reasoning_content"):
        items.append(_reasoning_item(_rid("rs"), message["reasoning_content"]))
    if message.get("content") or not message.get("tool_calls"):
        items.append(_message_item(_rid("msg"), message.get("content") or ""))
    for call in message.get("tool_calls") or []:
        items.append(_call_item(_rid("fc"), call["id"], call["function"]["name"], call["function"]["arguments"]))
    return items


def assistant_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output as chat history for a later ``previous_response_id``."""
    text = "".join(part["text"] for it in items if it["type"] == "message" for part in it["content"])
    calls = [{"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}}
             for it in items if it["type"] == "function_call"]
    msg: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        msg["tool_calls"] = calls
    return [msg]


ChatHandler = Callable[[p.ChatCompletionRequest, Request], Awaitable[Response]]


def add_responses_route(app: FastAPI, state: Any, chat_handler: ChatHandler) -> None:
    store = ResponsesStore(state.settings.responses_store_size)

    @app.post("/v1/responses", responses={200: {"content": {"text/event-stream": {}}}})
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        model = state.check_model(body.model)
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            if store.size <= 0:
                raise bad_request("previous_response_id: this server keeps no responses (start it with "
                                  "--responses-store-size N)", param="previous_response_id")
            found = store.get(body.previous_response_id)
            if found is None:
                raise APIError(404, f"previous_response_id: no stored response {body.previous_response_id!r}",
                               param="previous_response_id", code="not_found")
            history = found[1]
        chat, convo = to_chat(body, history)
        chat_req = p.ChatCompletionRequest.model_validate(chat)
        keep = store.size > 0 and body.store is not False
        builder = ResponseBuilder(body, model, keep)
        answer = await chat_handler(chat_req, request)
        if not body.stream:
            data = json.loads(bytes(answer.body))
            choice = data["choices"][0]
            items = output_items(choice["message"])
            incomplete = "max_output_tokens" if choice["finish_reason"] == "length" else None
            out = builder.envelope("incomplete" if incomplete else "completed", items, _usage(data.get("usage")),
                                   incomplete)
            if keep:
                store.put(out, convo + assistant_messages(items))
            return JSONResponse(out)
        assert isinstance(answer, StreamingResponse)
        return StreamingResponse(_events(answer.body_iterator, builder, store if keep else None, convo),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(chunks: AsyncIterator[Any], builder: ResponseBuilder, store: ResponsesStore | None,
                  convo: list[dict[str, Any]]) -> AsyncIterator[str]:
    """Chat chunks -> Responses events (created, item added, deltas, item done, completed)."""
    seq = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        data = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

    yield event("response.created", response=builder.envelope("in_progress", [], None))
    yield event("response.in_progress", response=builder.envelope("in_progress", [], None))
    items: list[dict[str, Any]] = []
    open_text: dict[str, Any] | None = None  # the message or reasoning item receiving deltas
    calls: dict[int, dict[str, Any]] = {}
    usage, finish = None, None

    def close_text() -> list[str]:
        nonlocal open_text
        if open_text is None:
            return []
        it, open_text = open_text, None
        idx = items.index(it)
        if it["type"] == "reasoning":
            return [event("response.reasoning_text.done", item_id=it["id"], output_index=idx, content_index=0,
                          text=it["content"][0]["text"]), event("response.output_item.done", output_index=idx,
                                                                item=it)]
        it["status"] = "completed"
        part = it["content"][0]
        return [event("response.output_text.done", item_id=it["id"], output_index=idx, content_index=0,
                      text=part["text"], logprobs=[]),
                event("response.content_part.done", item_id=it["id"], output_index=idx, content_index=0, part=part),
                event("response.output_item.done", output_index=idx, item=it)]

    def text_delta(kind: str, delta: str) -> list[str]:
        nonlocal open_text
        out: list[str] = []
        if open_text is not None and open_text["type"] != kind:
            out += close_text()
        if open_text is None:
            if kind == "reasoning":
                open_text = _reasoning_item(_rid("rs"), "")
                open_text["status"] = "in_progress"
            else:
                open_text = _message_item(_rid("msg"), "", status="in_progress")
                open_text["content"] = [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]
            items.append(open_text)
            idx = len(items) - 1
            added = dict(open_text, content=[]) if kind == "message" else open_text
            out.append(event("response.output_item.added", output_index=idx, item=added))
            if kind == "message":
                out.append(event("response.content_part.added", item_id=open_text["id"], output_index=idx,
                                 content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        idx = items.index(open_text)
        open_text["content"][0]["text"] += delta
        if kind == "reasoning":
            out.append(event("response.reasoning_text.delta", item_id=open_text["id"], output_index=idx,
                             content_index=0, delta=delta))
        else:
            out.append(event("response.output_text.delta", item_id=open_text["id"], output_index=idx,
                             content_index=0, delta=delta, logprobs=[]))
        return out

    async for raw in chunks:
        for line in str(raw if isinstance(raw, str) else raw.decode()).split("\n"):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                yield event("error", code=chunk["error"].get("code"), message=chunk["error"].get("message"),
                            param=chunk["error"].get("param"))
                failed = builder.envelope("failed", items, None)
                failed["error"] = {"code": "server_error", "message": chunk["error"].get("message", "")}
                yield event("response.failed", response=failed)
                return
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                finish = choice.get("finish_reason") or finish
                if delta.get("reasoning_content"):
                    for e in text_delta("reasoning", delta["reasoning_content"]):
                        yield e
                if delta.get("content"):
                    for e in text_delta("message", delta["content"]):
                        yield e
                for tc in delta.get("tool_calls") or []:
                    slot = calls.get(tc["index"])
                    fn = tc.get("function") or {}
                    if slot is None:
                        for e in close_text():
                            yield e
                        slot = _call_item(_rid("fc"), tc.get("id") or _rid("call"), fn.get("name") or "", "",
                                          status="in_progress")
                        calls[tc["index"]] = slot
                        items.append(slot)
                        yield event("response.output_item.added", output_index=len(items) - 1, item=dict(slot))
                    if fn.get("arguments"):
                        slot["arguments"] += fn["arguments"]
                        yield event("response.function_call_arguments.delta", item_id=slot["id"],
                                    output_index=items.index(slot), delta=fn["arguments"])
    for e in close_text():
        yield e
    for slot in calls.values():
        # a call cut off mid-arguments (max_output_tokens) was streamed as far as it went: incomplete
        slot["status"] = "completed" if _is_json(slot["arguments"]) else "incomplete"
        idx = items.index(slot)
        yield event("response.function_call_arguments.done", item_id=slot["id"], output_index=idx,
                    name=slot["name"], arguments=slot["arguments"])
        yield event("response.output_item.done", output_index=idx, item=slot)
    incomplete = "max_output_tokens" if finish == "length" else None
    final = builder.envelope("incomplete" if incomplete else "completed", items, _usage(usage), incomplete)
    if store is not None:
        store.put(final, convo + assistant_messages(items))
    yield event("response.incomplete" if incomplete else "response.completed", response=final)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
