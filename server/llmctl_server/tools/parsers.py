"""Tool-call parsers: the model's text -> content plus function calls, chosen with ``--tool-call-parser``.

Every parser reads the text once with ``str.find`` and ``json``'s decoder (no backtracking regexes), and the
pythonic one parses with ``ast`` and reads only literal values: model output is never evaluated. Text that does
not parse as a well-formed call stays content, so a malformed call is an ordinary answer, not an error.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field

MAX_PARSE_CHARS = 1_000_000  # longer outputs are returned as content unparsed


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in a tool call")
    return out


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


# Strict JSON for tool calls: what ``json`` accepts beyond the standard (NaN, duplicate keys that silently keep
# the last value, numbers that overflow to infinity) is refused, as the streamed path refuses it.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite)


def loads_strict(text: str) -> object:
    value, end = _DECODER.raw_decode(text, len(text) - len(text.lstrip()))
    if text[end:].strip():
        raise ValueError("extra data after the JSON value")
    return value


MAX_ARGS_DEPTH = 128  # the streamed path's limit too (tools/json_stream.MAX_DEPTH)


def _depth(value: object) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d <= MAX_ARGS_DEPTH:
                stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def dumps_args(args: object) -> str:
    """The arguments text of a call; ``encode`` refuses lone surrogates, which cannot go out as UTF-8."""
    if _depth(args) > MAX_ARGS_DEPTH:
        raise ValueError(f"arguments nest deeper than {MAX_ARGS_DEPTH}")
    text = json.dumps(args, ensure_ascii=False, allow_nan=False)
    text.encode("utf-8")
    return text


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


@dataclass
class ParsedOutput:
    content: str | None
    calls: list[ParsedCall] = field(default_factory=list)


class ToolParser:
    name = ""
    # Where a call can begin: streaming sends text before it as content and holds back what follows.
    start_marker = ""

    def parse(self, text: str) -> ParsedOutput:
        if len(text) > MAX_PARSE_CHARS:
            return ParsedOutput(text)
        try:
            parsed = self._parse(text)
        except (ValueError, TypeError, KeyError, RecursionError, MemoryError, SyntaxError):
            return ParsedOutput(text)
        return parsed if parsed is not None else ParsedOutput(text)

    def _parse(self, text: str) -> ParsedOutput | None:
        raise NotImplementedError


def _call_from_obj(obj: object, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ValueError("not a function call object")
    args: object = {}
    present = [key for key in args_keys if key in obj]
    if len(present) > 1:
        raise ValueError("both arguments and parameters")
    if present:
        args = obj[present[0]]
    if isinstance(args, str):  # some models put the arguments in as a JSON string
        args = loads_strict(args)
    if not isinstance(args, dict):
        raise ValueError("arguments must be an object")
    return ParsedCall(obj["name"], dumps_args(args))


def _json_values(text: str, sep: str = "") -> list[object]:
    """Consecutive JSON values in ``text`` (whitespace and optional ``sep`` between them); raises if anything
    else is there."""
    values, pos, n = [], 0, len(text)
    while True:
        while pos < n and (text[pos].isspace() or (sep and text.startswith(sep, pos))):
            pos += len(sep) if sep and text.startswith(sep, pos) else 1
        if pos >= n:
            return values
        value, pos = _DECODER.raw_decode(text, pos)
        values.append(value)


class HermesParser(ToolParser):
    """Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call."""

    name = "hermes"
    start_marker = "<tool_call>"
    end_marker = "</tool_call>"

    def _parse(self, text: str) -> ParsedOutput | None:
        first = text.find(self.start_marker)
        if first < 0:
            return None
        calls: list[ParsedCall] = []
        pos = first
        while pos >= 0:
            body_start = pos + len(self.start_marker)
            end = text.find(self.end_marker, body_start)
            body = text[body_start:end] if end >= 0 else text[body_start:]  # the last block may lack its end tag
            calls.append(_call_from_obj(loads_strict(body)))
            if end < 0:
                break
            after = end + len(self.end_marker)
            pos = text.find(self.start_marker, after)
            if text[after:pos if pos >= 0 else len(text)].strip():
                return None  # prose between or after the calls: not a clean tool-call answer
        content = text[:first].strip()
        return ParsedOutput(content or None, calls)


class Llama3JsonParser(ToolParser):
    """Llama 3.x JSON: ``{"name": ..., "parameters": {...}}`` (optionally after ``<|python_tag|>``, several
    separated by ``;``)."""

    name = "llama3_json"
    start_marker = "{"

    def _parse(self, text: str) -> ParsedOutput | None:
        body = text.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>"):]
        if not body.startswith("{"):
            return None
        calls = [_call_from_obj(v) for v in _json_values(body, ";")]
        return ParsedOutput(None, calls) if calls else None


class MistralParser(ToolParser):
    """Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``."""

    name = "mistral"
    start_marker = "[TOOL_CALLS]"

    def _parse(self, text: str) -> ParsedOutput | None:
        at = text.find(self.start_marker)
        if at < 0:
            return None
        values = _json_values(text[at + len(self.start_marker):])
        if len(values) != 1 or not isinstance(values[0], list) or not values[0]:
            return None
        content = text[:at].strip()
        return ParsedOutput(content or None, [_call_from_obj(v) for v in values[0]])


class PythonicParser(ToolParser):
    """Pythonic lists (Llama 3.2/4 style): ``[get_weather(city="Paris"), get_time()]``.

    Parsed with ``ast.parse``; only names, keyword arguments and literal values are accepted, so nothing in the
    text is ever executed."""

    name = "pythonic"
    start_marker = "["

    def _parse(self, text: str) -> ParsedOutput | None:
        body = text.strip()
        if body.startswith("<|python_start|>"):
            body = body[len("<|python_start|>"):]
        if body.endswith("<|python_end|>"):
            body = body[:-len("<|python_end|>")]
        if not body.startswith("["):
            return None
        tree = ast.parse(body, mode="eval")
        if not isinstance(tree.body, ast.List) or not tree.body.elts:
            return None
        calls = []
        for node in tree.body.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return None
            args = {}
            for kw in node.keywords:
                if kw.arg is None or kw.arg in args:
                    return None
                args[kw.arg] = ast.literal_eval(kw.value)
            calls.append(ParsedCall(node.func.id, dumps_args(args)))
        return ParsedOutput(None, calls)


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "qwen": HermesParser,
    "llama3_json": Llama3JsonParser,
    "llama4_json": Llama3JsonParser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"tool_call_parser: unknown parser {name!r}; use one of {', '.join(sorted(PARSERS))}") \
            from None
