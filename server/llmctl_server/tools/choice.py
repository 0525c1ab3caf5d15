"""``tools`` / ``tool_choice`` checks, and the structured-output constraint that enforces ``required`` and named
choices: the model then can only write valid JSON for the tools' parameter schemas, so these work with no
tool-call parser at all (as in OpenAI's API)."""

from __future__ import annotations

import json
from typing import Any

from llmctl_server import protocol as p
from llmctl_server.errors import bad_request

MAX_TOOLS = 128
MAX_TOOLS_BYTES = 256 * 1024


def check_tools(req: p.ChatCompletionRequest) -> None:
    tools = req.tools or []
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"tools: at most {MAX_TOOLS} tools, got {len(tools)}", param="tools")
    size = len(json.dumps([t.model_dump(exclude_none=True) for t in tools], separators=(",", ":")).encode())
    if size > MAX_TOOLS_BYTES:
        raise bad_request(f"tools: the tool list is {size} bytes, over the cap of {MAX_TOOLS_BYTES} bytes",
                          param="tools")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tools: function names must be unique", param="tools")
    choice = req.tool_choice
    if isinstance(choice, p.NamedToolChoice):
        if choice.function.name not in names:
            raise bad_request(f"tool_choice: no tool named {choice.function.name!r} in tools", param="tool_choice")
    elif choice == "required" and not tools:
        raise bad_request("tool_choice: 'required' needs at least one tool in tools", param="tool_choice")


def _parameters(tool: p.ChatTool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else {"type": "object"}


def named_tool(req: p.ChatCompletionRequest) -> p.ChatTool | None:
    choice = req.tool_choice
    if not isinstance(choice, p.NamedToolChoice):
        return None
    return next(t for t in (req.tools or []) if t.function.name == choice.function.name)


def tool_choice_schema(req: p.ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema the output must follow, for ``required`` and named choices (None otherwise).

    Named: the function's arguments object itself. Required: a list of ``{"name", "parameters"}`` objects, one
    of the tools each (at most one when ``parallel_tool_calls`` is false)."""
    tool = named_tool(req)
    if tool is not None:
        return _parameters(tool)
    if req.tool_choice != "required":
        return None
    one_of = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                                 "parameters": _parameters(t)},
               "required": ["name", "parameters"], "additionalProperties": False} for t in req.tools or []]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema
