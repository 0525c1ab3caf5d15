"""Turns one chat choice's generated text into the assistant message: reasoning, content and tool calls, for a
finished text (``final``) and as OpenAI stream deltas of a growing text (``delta``)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmctl_server.reasoning import ReasoningParser
from llmctl_server.tools.call_stream import STREAM_FORMATS, ToolCallStreamer
from llmctl_server.tools.parsers import ParsedCall, ParsedOutput, ToolParser, dumps_args, loads_strict


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolMode:
    """How tool calls are read from the content: ``named`` (the whole content is the arguments of ``name``),
    ``required`` (a JSON list of {name, parameters}), ``auto`` (a parser finds them), or None (plain text)."""

    kind: str | None = None
    name: str | None = None
    parser: ToolParser | None = None


@dataclass
class ChatMessageOut:
    content: str | None
    reasoning: str | None
    calls: list[ParsedCall]


def parse_required(text: str) -> ParsedOutput:
    try:
        items = loads_strict(text)
        calls = [ParsedCall(it["name"], dumps_args(it["parameters"])) for it in items]  # type: ignore[union-attr]
    except (ValueError, TypeError, KeyError, RecursionError):
        return ParsedOutput(text)
    return ParsedOutput(None, calls) if calls else ParsedOutput(text)


def parse_named(name: str, text: str) -> ParsedOutput:
    try:
        args = json.loads(text)
    except (ValueError, RecursionError):
        return ParsedOutput(text)  # cut off by max_tokens: not a usable call
    if not isinstance(args, dict):
        return ParsedOutput(text)
    return ParsedOutput(None, [ParsedCall(name, text.strip())])


@dataclass
class ChatChoiceOutput:
    mode: ToolMode = field(default_factory=ToolMode)
    reasoner: ReasoningParser | None = None
    # streaming progress
    sent_reasoning: int = 0
    sent_content: int = 0
    sent_args: int = 0
    calls_sent: int = 0
    header_sent: bool = False
    call_ids: list[str] = field(default_factory=list)
    streamer: ToolCallStreamer | None = None

    # -- whole texts ------------------------------------------------------------------------------------------
    def final(self, text: str) -> ChatMessageOut:
        reasoning, content = self.reasoner.split(text) if self.reasoner is not None else (None, text)
        parsed = self._tools(content)
        return ChatMessageOut(parsed.content, reasoning, parsed.calls)

    def _tools(self, content: str) -> ParsedOutput:
        mode = self.mode
        if mode.kind == "named" and mode.name:
            return parse_named(mode.name, content)
        if mode.kind == "required":
            return parse_required(content)
        if mode.kind == "auto" and mode.parser is not None:
            return mode.parser.parse(content)
        return ParsedOutput(content)

    def finish_reason(self, calls: list[ParsedCall], reason: str | None) -> str | None:
        if calls and self.mode.kind in ("auto", "required") and reason == "stop":
            return "tool_calls"
        return reason

    def ids(self, n: int) -> list[str]:
        while len(self.call_ids) < n:
            self.call_ids.append(new_call_id())
        return self.call_ids[:n]

    # -- streaming --------------------------------------------------------------------------------------------
    def delta(self, text: str, finished: bool) -> tuple[dict[str, Any], list[ParsedCall]]:
        """The delta message for the text so far; the second item lists every call found once ``finished``."""
        out: dict[str, Any] = {}
        if self.reasoner is not None:
            if finished:
                reasoning, content = self.reasoner.split(text)
                reasoning = reasoning or ""
            else:
                reasoning, content = self.reasoner.split_stable(text)
            if len(reasoning) > self.sent_reasoning:
                out["reasoning_content"] = reasoning[self.sent_reasoning:]
                self.sent_reasoning = len(reasoning)
        else:
            content = text
        mode = self.mode
        if mode.kind == "named" and mode.name:
            return self._named_delta(out, content, finished)
        fmt = "required" if mode.kind == "required" else (mode.parser.name if mode.kind == "auto" and mode.parser
                                                          else None)
        if fmt in STREAM_FORMATS:
            return self._streamed_calls(out, content, finished, fmt)  # type: ignore[arg-type]
        if mode.kind in ("required", "auto"):
            return self._buffered_delta(out, content, finished)
        self._content_delta(out, content, len(content))
        return out, []

    def _content_delta(self, out: dict[str, Any], content: str, upto: int) -> None:
        if upto > self.sent_content:
            out["content"] = content[self.sent_content:upto]
            self.sent_content = upto

    def _named_delta(self, out: dict[str, Any], content: str, finished: bool) -> tuple[dict[str, Any], list]:
        """The content is the arguments: stream it as argument deltas of one call."""
        call: dict[str, Any] = {"index": 0}
        if not self.header_sent and (content or finished):
            call.update(id=self.ids(1)[0], type="function", function={"name": self.mode.name, "arguments": ""})
            self.header_sent = True
        if len(content) > self.sent_args:
            call.setdefault("function", {})["arguments"] = content[self.sent_args:]
            self.sent_args = len(content)
        if len(call) > 1:
            out["tool_calls"] = [call]
        calls = parse_named(self.mode.name or "", content).calls if finished else []
        return out, calls

    def _streamed_calls(self, out: dict[str, Any], content: str, finished: bool, fmt: str
                        ) -> tuple[dict[str, Any], list]:
        """Content as it comes, each call announced once its name is read, its arguments as fragments."""
        if self.streamer is None:
            self.streamer = ToolCallStreamer(fmt)
        update = self.streamer.feed(content, finished)
        if update.content:
            out["content"] = update.content
        deltas = []
        for ev in update.events:
            entry: dict[str, Any] = {"index": ev.index}
            if ev.name is not None:
                entry.update(id=self.ids(ev.index + 1)[ev.index], type="function",
                             function={"name": ev.name, "arguments": ev.arguments})
            else:
                entry["function"] = {"arguments": ev.arguments}
            deltas.append(entry)
        if deltas:
            out["tool_calls"] = deltas
        return out, update.calls

    def _buffered_delta(self, out: dict[str, Any], content: str, finished: bool) -> tuple[dict[str, Any], list]:
        """Content before a possible call streams; from there on the text is held until the end, then sent as
        calls if it parses, or as content if it does not."""
        marker = self.mode.parser.start_marker if self.mode.kind == "auto" and self.mode.parser else "["
        at_start_only = marker in ("[", "{")
        if at_start_only:
            stripped = content.lstrip()
            hold_from = 0 if (not stripped or stripped.startswith(marker) or
                              (marker == "{" and "<|python_tag|>".startswith(stripped[:14]))) else len(content)
        else:
            at = content.find(marker)
            hold_from = at if at >= 0 else _safe_prefix(content, marker)
        if not finished:
            self._content_delta(out, content, min(hold_from, len(content)) if hold_from >= self.sent_content
                                else self.sent_content)
            return out, []
        parsed = self._tools(content)
        if not parsed.calls:
            self._content_delta(out, content, len(content))
            return out, []
        if parsed.content and len(parsed.content) > self.sent_content:
            out["content"] = parsed.content[self.sent_content:]
        ids = self.ids(len(parsed.calls))
        out["tool_calls"] = [{"index": i, "id": ids[i], "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}}
                             for i, c in enumerate(parsed.calls)]
        return out, parsed.calls


def _safe_prefix(text: str, marker: str) -> int:
    """Length of ``text`` that cannot be the start of ``marker`` (a partial marker at the end is held back)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return len(text) - k
    return len(text)
