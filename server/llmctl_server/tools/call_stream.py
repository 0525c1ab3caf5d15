"""Tool calls streamed as OpenAI streams them: for each call a first delta with its id, type and name, then
``function.arguments`` fragments that join up to the arguments of the non-streamed answer.

A ``ToolCallStreamer`` reads the growing content of one choice once, in linear time: prose goes out as content
up to where a call can begin (a partial marker is held back), a call is announced as soon as its name is read,
and its arguments go out through :class:`~llmctl_server.tools.json_stream.JsonValueStream`, which only ever
writes a prefix of the final arguments text. Pythonic calls (``[f(a=1)]``) go out one keyword argument at a time,
each value read with ``ast.literal_eval`` (never evaluated).

What was streamed cannot be taken back. When the text stops being a well-formed tool-call answer (prose after
the calls, invalid JSON, an unfinished call at the end), streaming of calls stops there: if no call had been
announced, the whole answer goes out as content (as the non-streamed answer has it); otherwise the text from the
start of the broken call on goes out as content. ``finish_reason`` is ``tool_calls`` only when the whole answer
parsed as calls.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field

from llmctl_server.tools.json_stream import JsonStreamError, JsonValueStream, canonical_json
from llmctl_server.tools.parsers import MAX_PARSE_CHARS, ParsedCall

_WS = re.compile(r"[ \t\n\r]*")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


STREAM_FORMATS = ("hermes", "mistral", "llama3_json", "pythonic", "required")


class _Broken(Exception):
    pass


@dataclass
class CallEvent:
    """One call's progress in one delta: ``name`` on the call's first event, then argument text."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamUpdate:
    content: str = ""
    events: list[CallEvent] = field(default_factory=list)
    calls: list[ParsedCall] = field(default_factory=list)  # every call, once finished and the whole answer parsed


class _CallParser:
    """What the streamer reads from either call syntax: the name once known, argument text not yet handed out
    (``take_args``), and whether the call is complete."""

    def __init__(self) -> None:
        self.slot: int | None = None  # the call's index once announced
        self.name: str | None = None
        self.args: list[str] = []  # argument text not yet handed out
        self.keys: set[str] = set()
        self.done = False

    def take_args(self) -> str:
        if self.name is None:
            return ""
        out = "".join(self.args)
        self.args.clear()
        return out


class _CallObject(_CallParser):
    """``{"name": ..., "arguments": {...}}`` (keys in any order; extra keys ignored, as the non-streamed parsers
    do). Arguments read before the name are held until the name is known."""

    def __init__(self, args_keys: tuple[str, ...], args_required: bool = False) -> None:
        super().__init__()
        self.args_keys = args_keys
        self.args_required = args_required
        self._key = ""
        self.state = "open"
        self.reader: JsonValueStream | None = None
        self.role = ""
        self.args_seen = False

    def feed(self, text: str, pos: int, final: bool) -> int:
        n = len(text)
        while pos < n and not self.done:
            if self.reader is not None:
                pos = self.reader.feed(text, pos)
                if self.role == "args":
                    self.args.append(self.reader.take())
                if self.reader.done:
                    self._value_done()
                continue
            pos = _WS.match(text, pos).end()
            if pos >= n:
                break
            ch = text[pos]
            if self.state == "open":
                if ch != "{":
                    raise _Broken
                self.state = "first"
            elif self.state in ("first", "key"):
                if ch == "}" and self.state == "first":
                    self._close()
                elif ch == '"':
                    self.reader, self.role = JsonValueStream(), "key"
                    continue
                else:
                    raise _Broken
            elif self.state == "colon":
                if ch != ":":
                    raise _Broken
                self.state = "value"
            elif self.state == "value":
                key = self._key
                if key == "name":
                    self.role = "name"
                elif key in self.args_keys:
                    if self.args_seen or ch not in '{"':
                        raise _Broken  # two arguments keys, or arguments that are not an object
                    self.args_seen = True
                    self.role = "args" if ch == "{" else "args_text"
                else:
                    self.role = "skip"
                self.reader = JsonValueStream()
                continue
            elif self.state == "after":
                if ch == ",":
                    self.state = "key"
                elif ch == "}":
                    self._close()
                else:
                    raise _Broken
            pos += 1
        if final and not self.done:
            raise _Broken
        return pos

    def _value_done(self) -> None:
        reader, role = self.reader, self.role
        self.reader = None
        if role == "key":
            key = reader.string_value  # type: ignore[union-attr]
            if key in self.keys:
                raise _Broken
            self.keys.add(key)  # type: ignore[arg-type]
            self._key = key
            self.state = "colon"
            return
        if role == "name":
            if not reader.string_value:  # type: ignore[union-attr]
                raise _Broken
            self.name = reader.string_value  # type: ignore[union-attr]
        elif role == "args_text":  # arguments sent as a JSON string holding the object
            args = canonical_json(reader.string_value or "")  # type: ignore[union-attr]
            if not args.startswith("{"):
                raise _Broken
            self.args.append(args)
        self.state = "after"

    def _close(self) -> None:
        if self.name is None:
            raise _Broken
        if not self.args_seen:
            if self.args_required:
                raise _Broken
            self.args.append("{}")
        self.done = True



class _PythonicCall(_CallParser):
    """``name(kw=literal, ...)``: the name once ``(`` is read, then one keyword argument per fragment."""

    def __init__(self) -> None:
        super().__init__()
        self.state = "name"
        self.value_start = 0
        self.scan = 0
        self.depth = 0
        self.quote = ""
        self.kw = ""

    def feed(self, text: str, pos: int, final: bool) -> int:
        n = len(text)
        while pos < n and not self.done:
            if self.state == "value":
                pos = self._scan_value(text, pos, final)
                continue
            pos = _WS.match(text, pos).end()
            if pos >= n:
                break
            if self.state in ("name", "kw"):
                m = _IDENT.match(text, pos)
                if m is None:
                    if self.state == "kw" and text[pos] == ")" and not self.keys:
                        self._close()
                        pos += 1
                        continue
                    raise _Broken
                if m.end() >= n and not final:
                    break  # the identifier may go on
                word = m.group()
                pos = m.end()
                if self.state == "name":
                    self.name, self.state = None, "open"
                    self.kw = word
                else:
                    if word in self.keys:
                        raise _Broken
                    self.kw, self.state = word, "eq"
            elif self.state == "open":
                if text[pos] != "(":
                    raise _Broken
                self.name, self.state = self.kw, "kw"
                self.args.append("{")
                pos += 1
            elif self.state == "eq":
                if text[pos] != "=":
                    raise _Broken
                self.state, self.value_start, self.scan, self.depth, self.quote = "value", pos + 1, pos + 1, 0, ""
                pos += 1
            elif self.state == "sep":
                if text[pos] == ",":
                    self.state = "kw"
                elif text[pos] == ")":
                    self._close()
                else:
                    raise _Broken
                pos += 1
        if final and not self.done:
            raise _Broken
        return pos

    def _scan_value(self, text: str, pos: int, final: bool) -> int:
        """Find where the keyword's value ends (a ``,`` or ``)`` outside brackets and strings)."""
        n = len(text)
        i = self.scan
        while i < n:
            ch = text[i]
            if self.quote:
                if ch == "\\":
                    if i + 1 >= n:
                        break
                    i += 2
                    continue
                if text.startswith(self.quote, i):
                    i += len(self.quote)
                    self.quote = ""
                    continue
                if len(self.quote) == 3 and i + 3 > n and not final:
                    break  # a closing triple quote may be arriving
                i += 1
                continue
            if ch in "'\"":
                if i + 3 > n and not final:
                    break  # cannot tell a triple quote yet
                self.quote = ch * 3 if text.startswith(ch * 3, i) else ch
                i += len(self.quote)
                continue
            if ch in "([{":
                self.depth += 1
            elif ch in ")]}":
                if self.depth == 0:
                    if ch != ")":
                        raise _Broken
                    self._value(text[self.value_start:i])
                    self._close()
                    return i + 1
                self.depth -= 1
            elif ch == "," and self.depth == 0:
                self._value(text[self.value_start:i])
                self.state = "kw"
                return i + 1
            i += 1
        self.scan = i
        if final:
            raise _Broken
        return n

    def _value(self, source: str) -> None:
        try:
            value = ast.literal_eval(source.strip())
            dumped = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as exc:
            raise _Broken from exc
        self.args.append(("" if not self.keys else ", ") + json.dumps(self.kw, ensure_ascii=False) + ": " + dumped)
        self.keys.add(self.kw)

    def _close(self) -> None:
        self.args.append("}")
        self.done = True



@dataclass
class _Announced:
    name: str
    arguments: list[str] = field(default_factory=list)


class ToolCallStreamer:
    """The content of one choice in one tool-call format, as it grows.

    ``fmt``: ``hermes`` (``<tool_call>{...}</tool_call>``), ``mistral`` (``[TOOL_CALLS] [{...}, ...]``),
    ``llama3_json`` (``{...}; {...}``, optionally after ``<|python_tag|>``), ``pythonic`` (``[f(a=1), g()]``), or
    ``required`` (the JSON list that ``tool_choice="required"`` constrains the output to)."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.args_keys = ("parameters",) if fmt == "required" else ("arguments", "parameters")
        self.state = "prose" if fmt in ("hermes", "mistral") else "lead"
        self.pos = 0
        self.content_from = 0  # where unsent content starts
        self.content_to = 0  # content sent up to here
        self.call_start = 0  # where the current call's text starts (for a break)
        self.call: _CallObject | _PythonicCall | None = None
        self.announced: list[_Announced] = []
        self.broken = False
        self.finished = False

    # -- public ----------------------------------------------------------------------------------------------
    def feed(self, text: str, finished: bool) -> StreamUpdate:
        out = StreamUpdate()
        if self.finished:
            return out
        if len(text) > MAX_PARSE_CHARS and not self.broken:
            self._break(out)
        if self.broken:
            self._send_content(out, text, len(text))
            self.finished = finished
            return out
        try:
            self._run(text, finished, out)
            if finished:
                self._end(text, out)
        except (_Broken, JsonStreamError):
            self._break(out)
            self._send_content(out, text, len(text))
        self.finished = finished
        return out

    # -- internals -------------------------------------------------------------------------------------------
    def _break(self, out: StreamUpdate) -> None:
        self.broken = True
        if self.announced:  # from the broken call (or the unexpected text after the calls) on, it is content
            self.content_to = max(self.content_to, self.call_start if self.call is not None else self.pos)

    def _send_content(self, out: StreamUpdate, text: str, upto: int) -> None:
        start = max(self.content_to, self.content_from)
        if upto > start:
            out.content += text[start:upto]
            self.content_to = upto

    def _prose(self, text: str, marker: str, finished: bool, out: StreamUpdate) -> bool:
        """Send content up to ``marker`` (leading and trailing whitespace held back); True once it is read."""
        at = text.find(marker, self.pos)
        upto = at if at >= 0 else (len(text) if finished else _safe_prefix(text, marker, self.pos))
        if self.content_to == 0 and not text[:upto].strip():
            self.content_from = upto  # nothing but whitespace yet
        else:
            keep = len(text[:upto].rstrip()) if not finished or at >= 0 else upto
            if self.content_to == 0:
                self.content_from = len(text) - len(text.lstrip())
            self._send_content(out, text, keep)
        if at < 0:
            self.pos = upto
            return False
        self.call_start = at
        self.pos = at + len(marker)
        return True

    def _literal(self, text: str, lit: str, finished: bool) -> bool | None:
        """Whether ``lit`` comes next (consumed if so); None while the text so far is a prefix of it."""
        rest = text[self.pos:self.pos + len(lit)]
        if rest == lit:
            self.pos += len(lit)
            return True
        if lit.startswith(rest) and not finished:
            return None
        return False

    def _ws(self, text: str) -> bool:
        self.pos = _WS.match(text, self.pos).end()
        return self.pos < len(text)

    def _feed_call(self, text: str, finished: bool, out: StreamUpdate) -> bool:
        """Feed the current call; announce it once its name is known and pass on its argument text."""
        call = self.call
        assert call is not None
        self.pos = call.feed(text, self.pos, finished)
        if call.slot is None and call.name is not None:
            call.slot = len(self.announced)
            self.announced.append(_Announced(call.name))
            out.events.append(CallEvent(call.slot, name=call.name))
        if call.slot is not None:
            piece = call.take_args()
            if piece:
                self.announced[call.slot].arguments.append(piece)
                if out.events and out.events[-1].index == call.slot:
                    out.events[-1].arguments += piece
                else:
                    out.events.append(CallEvent(call.slot, arguments=piece))
        if call.done:
            self.call = None
            return True
        return False

    def _start_call(self, at: int) -> None:
        self.call_start = at
        self.call = _PythonicCall() if self.fmt == "pythonic" else \
            _CallObject(self.args_keys, args_required=self.fmt == "required")

    def _run(self, text: str, finished: bool, out: StreamUpdate) -> None:
        fmt = self.fmt
        while True:
            st = self.state
            if self.call is not None:
                if not self._feed_call(text, finished, out):
                    return
                self.state = {"hermes": "end_tag", "mistral": "list_sep", "required": "list_sep",
                              "pythonic": "list_sep", "llama3_json": "json_sep"}[fmt]
                continue
            if st == "prose":
                marker = "<tool_call>" if fmt == "hermes" else "[TOOL_CALLS]"
                if not self._prose(text, marker, finished, out):
                    return
                self.state = "call" if fmt == "hermes" else "list_open"
            elif st == "lead":  # llama3_json / pythonic / required: the answer must start with the calls
                if not self._ws(text):
                    return
                tag = {"llama3_json": "<|python_tag|>", "pythonic": "<|python_start|>"}.get(fmt)
                if tag is not None:
                    got = self._literal(text, tag, finished)
                    if got is None:
                        return
                    if got and not self._ws(text):
                        return
                opener = "{" if fmt == "llama3_json" else "["
                if text[self.pos] != opener:
                    raise _Broken  # not a tool-call answer: all of it is content
                self.call_start = 0
                if fmt == "llama3_json":
                    self.state = "call"
                else:
                    self.pos += 1
                    self.state = "list_first"
            elif st == "list_open":  # mistral, after [TOOL_CALLS]
                if not self._ws(text):
                    return
                if text[self.pos] != "[":
                    raise _Broken
                self.pos += 1
                self.state = "list_first"
            elif st in ("call", "list_first", "list_next"):
                if not self._ws(text):
                    return
                self._start_call(self.pos if st != "call" or fmt != "hermes" else self.call_start)
            elif st == "list_sep":
                if not self._ws(text):
                    return
                ch = text[self.pos]
                self.pos += 1
                if ch == ",":
                    self.state = "list_next"
                elif ch == "]":
                    self.state = "tail"
                else:
                    raise _Broken
            elif st == "json_sep":  # llama3_json: more objects, separated by ';' or whitespace
                if not self._ws(text):
                    return
                if text[self.pos] == ";":
                    self.pos += 1
                    continue
                if text[self.pos] != "{":
                    raise _Broken
                self.state = "call"
            elif st == "end_tag":  # hermes
                if not self._ws(text):
                    return
                got = self._literal(text, "</tool_call>", finished)
                if got is None:
                    return
                if not got:
                    raise _Broken
                self.state = "between"
            elif st == "between":  # hermes: whitespace, then another call or the end
                if not self._ws(text):
                    return
                got = self._literal(text, "<tool_call>", finished)
                if got is None:
                    return
                if not got:
                    raise _Broken
                self.call_start = self.pos - len("<tool_call>")
                self.state = "call"
            elif st == "tail":
                if fmt == "pythonic":
                    if not self._ws(text):
                        return
                    got = self._literal(text, "<|python_end|>", finished)
                    if got is None:
                        return
                    if not got:
                        raise _Broken
                    self.state = "tail_ws"
                else:
                    self.state = "tail_ws"
            elif st == "tail_ws":
                if self._ws(text):
                    raise _Broken
                return
            else:  # pragma: no cover
                raise AssertionError(st)

    def _end(self, text: str, out: StreamUpdate) -> None:
        ok_states = {"hermes": ("end_tag", "between"), "mistral": ("tail", "tail_ws"),
                     "llama3_json": ("json_sep",), "pythonic": ("tail", "tail_ws"),
                     "required": ("tail", "tail_ws")}[self.fmt]
        if self.call is not None or self.state not in ok_states or not self.announced:
            raise _Broken
        out.calls = [ParsedCall(a.name, "".join(a.arguments)) for a in self.announced]


def _safe_prefix(text: str, marker: str, start: int) -> int:
    """How much of ``text`` cannot be the start of ``marker`` (a partial marker at the end is held back)."""
    n = len(text)
    for k in range(min(len(marker) - 1, n - start), 0, -1):
        if marker.startswith(text[n - k:]):
            return n - k
    return n
