"""What a chat request needs beyond sampling: messages (tool calls and tool results included) as the chat
template expects them, the tools it is given, the structured-output constraint (from ``response_format`` or
from a ``required``/named ``tool_choice``), and how each choice's text becomes the assistant message."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from llmctl.structured_output import StructuredOutputsParams

from llmctl_server import protocol as p
from llmctl_server.chat_output import ChatChoiceOutput, ToolMode
from llmctl_server.errors import bad_request
from llmctl_server.reasoning import ReasoningParser, get_reasoning_parser
from llmctl_server.settings import ServerSettings
from llmctl_server.structured import request_backend, structured_params
from llmctl_server.tools.choice import check_tools, named_tool, tool_choice_schema
from llmctl_server.tools.parsers import get_tool_parser


@dataclass
class ChatPlan:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    structured: StructuredOutputsParams | None
    mode: ToolMode
    reasoner_name: str | None
    # Image parts in message order as (field name, URL); each stands in its message's content as image_marker
    # until the renderer turns the marker into the model's image token (see ChatRenderer.tokenize).
    images: list[tuple[str, str]] = field(default_factory=list)
    image_marker: str | None = None

    @property
    def active(self) -> bool:
        """Whether the text needs reading at all (reasoning split or tool calls)."""
        return self.mode.kind is not None or self.reasoner_name is not None

    def choice_output(self) -> ChatChoiceOutput:
        reasoner: ReasoningParser | None = get_reasoning_parser(self.reasoner_name) if self.reasoner_name else None
        return ChatChoiceOutput(mode=self.mode, reasoner=reasoner)


def new_image_marker() -> str:
    """A per-request marker for an image's place in the rendered text: a client cannot guess it, so no text it
    sends can become an image token (content is never parsed for special tokens)."""
    return f"\ue000img-{secrets.token_hex(8)}\ue001"


def template_messages(messages: list[p.ChatMessage], image_marker: str | None = None,
                      image_separator: str = "\n") -> list[dict[str, Any]]:
    """Messages as dicts for the chat template. Tool-call arguments are handed over parsed (templates such as
    Qwen's and Llama's serialise them themselves) when they are a JSON object. A message's images become one
    ``image_marker`` each before its text, followed by ``image_separator`` (a line break, or nothing for models
    whose template writes nothing there; templates see plain string content); without a marker, image parts are
    refused."""
    out = []
    for i, m in enumerate(messages):
        content = m.text()
        urls = m.image_urls()
        if urls:
            if image_marker is None:
                raise bad_request(f"messages[{i}].content: image parts are not accepted here", param="messages")
            content = image_separator.join([image_marker] * len(urls) + ([content] if content else []))
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            calls = []
            for tc in m.tool_calls:
                try:
                    args: Any = json.loads(tc.function.arguments)
                except ValueError:
                    args = tc.function.arguments
                calls.append({"id": tc.id, "type": "function",
                              "function": {"name": tc.function.name, "arguments": args}})
            msg["tool_calls"] = calls
        if m.role == "tool":
            if m.tool_call_id is None:
                raise bad_request("messages: a 'tool' message needs tool_call_id", param="messages")
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def plan_chat(body: p.ChatCompletionRequest, settings: ServerSettings, reasoning_end_ids: list[int] | None,
              image_separator: str = "\n") -> ChatPlan:
    check_tools(body)
    structured = structured_params(body)
    choice = body.tool_choice
    if choice is None:
        # OpenAI's default is "auto" when tools are given; without a parser the answer stays plain text.
        choice = "auto" if body.tools and settings.enable_auto_tool_choice else "none"
    mode = ToolMode()
    if body.tools and choice == "auto":
        if not (settings.enable_auto_tool_choice and settings.tool_call_parser):
            raise bad_request('tool_choice: "auto" needs the server started with --enable-auto-tool-choice and '
                              '--tool-call-parser', param="tool_choice")
        mode = ToolMode("auto", parser=get_tool_parser(settings.tool_call_parser))
    elif choice == "required":
        mode = ToolMode("required")
    elif isinstance(choice, p.NamedToolChoice):
        tool = named_tool(body)
        mode = ToolMode("named", name=tool.function.name if tool else None)
    schema = tool_choice_schema(body) if body.tools else None
    if schema is not None:
        if structured is not None:
            raise bad_request("response_format: cannot be combined with a 'required' or named tool_choice",
                              param="response_format")
        try:
            # compact JSON: arguments are read by programs, and a model cannot pad them with whitespace forever
            structured = StructuredOutputsParams(json=schema, field_name="tools", disable_any_whitespace=True,
                                                 backend=request_backend(body))
        except ValueError as exc:
            raise bad_request(str(exc), param="tools") from None
    if structured is not None and reasoning_end_ids:
        structured.reasoning_end_token_ids = list(reasoning_end_ids)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and choice != "none" else None
    images = [(f"messages[{i}].content[{j}].image_url", part.image_url.url)
              for i, m in enumerate(body.messages) if isinstance(m.content, list)
              for j, part in enumerate(m.content) if isinstance(part, p.ImageURLContentPart)]
    marker = new_image_marker() if images else None
    return ChatPlan(template_messages(body.messages, marker, image_separator), tools, structured, mode,
                    settings.reasoning_parser, images, marker)
