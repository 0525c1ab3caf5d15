"""An incremental JSON scanner: reads one JSON value from a text that grows, a piece at a time, and writes the
value back out in the form ``json.dumps(json.loads(text), ensure_ascii=False)`` gives, as far as it has read.

Tool-call arguments stream through it: what it has written is always a prefix of the final arguments text, so
a client that joins the fragments gets exactly what the non-streamed answer holds. It keeps its state between
calls and never re-reads a character, so a long or adversarial output costs linear time; runs of plain string
characters and whitespace are skipped with single-character-class regexes, which cannot backtrack.

Refused (``JsonStreamError``), so that nothing the client receives is JSON that ``json.loads`` would treat
differently: duplicate keys, ``NaN``/``Infinity`` and numbers that overflow to them, lone surrogate escapes,
nesting deeper than ``MAX_DEPTH``.
"""

from __future__ import annotations

import json
import math
import re

MAX_DEPTH = 128

_WS = re.compile(r"[ \t\n\r]*")
_PLAIN = re.compile(r'[^"\\\x00-\x1f]*')
_NUMBER_CHARS = re.compile(r"[0-9eE+.\-]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_LITERALS = ("true", "false", "null")
_HEX = frozenset("0123456789abcdefABCDEF")

# states
_VALUE, _OBJ_FIRST, _OBJ_KEY, _COLON, _ARR_FIRST, _AFTER, _STRING, _ESCAPE, _UNICODE, _NUMBER_S, _LITERAL, \
    _DONE = range(12)


class JsonStreamError(ValueError):
    pass


def _escaped(chars: str) -> str:
    """``chars`` as they appear inside a string written by ``json.dumps(..., ensure_ascii=False)``."""
    return json.dumps(chars, ensure_ascii=False)[1:-1]


class JsonValueStream:
    """One JSON value. ``feed(text, pos, final)`` reads ``text`` from ``pos`` and returns where it stopped: at
    the end of the text, or just past the value once ``done``. ``take()`` returns what was written since the
    last call. For a value that is a string, ``string_value`` holds it decoded once ``done``."""

    def __init__(self) -> None:
        self.state = _VALUE
        self.stack: list[set[str] | None] = []  # one entry per open container: the keys seen (objects) or None
        self.done = False
        self._out: list[str] = []
        self._buf = ""  # a number, literal or \\u escape being read; a key being read
        self._key: list[str] | None = None  # decoded characters of the key being read
        self._string: list[str] | None = None  # decoded characters of a top-level string value
        self._high: int | None = None  # a high surrogate waiting for its low half
        self._in_key = False
        self._pending_key = ""
        self.string_value: str | None = None

    def take(self) -> str:
        out = "".join(self._out)
        self._out.clear()
        return out

    # -- helpers -------------------------------------------------------------------------------------------
    def _emit(self, piece: str) -> None:
        if self._in_key:
            return  # a key is written whole once its colon is read
        self._out.append(piece)

    def _string_chars(self, chars: str) -> None:
        if self._in_key:
            self._key.append(chars)  # type: ignore[union-attr]
        else:
            if self._string is not None:
                self._string.append(chars)
            self._emit(_escaped(chars))

    def _value_done(self) -> None:
        self.state = _AFTER if self.stack else _DONE
        if not self.stack:
            self.done = True

    def _end_string(self) -> None:
        if self._high is not None:
            raise JsonStreamError("lone surrogate escape in a string")
        if self._in_key:
            key = "".join(self._key or [])
            keys = self.stack[-1]
            if keys is None or key in keys:
                raise JsonStreamError(f"duplicate key {key!r}")
            keys.add(key)
            self._in_key = False
            self._pending_key = key
            self.state = _COLON
            return
        self._emit('"')
        if self._string is not None and not self.stack:
            self.string_value = "".join(self._string)
        self._value_done()

    def _open(self, char: str) -> None:
        if len(self.stack) >= MAX_DEPTH:
            raise JsonStreamError(f"nesting deeper than {MAX_DEPTH}")
        self._emit(char)
        if char == "{":
            self.stack.append(set())
            self.state = _OBJ_FIRST
        else:
            self.stack.append(None)
            self.state = _ARR_FIRST

    def _close(self, char: str) -> None:
        self._emit(char)
        self.stack.pop()
        self._value_done()

    def _finish_number(self) -> None:
        text = self._buf
        self._buf = ""
        if not _NUMBER.fullmatch(text):
            raise JsonStreamError(f"invalid number {text[:40]!r}")
        value = json.loads(text)
        if isinstance(value, float) and math.isinf(value):
            raise JsonStreamError("number out of range")
        self._emit(json.dumps(value))
        self._value_done()

    # -- the reader ----------------------------------------------------------------------------------------
    def feed(self, text: str, pos: int, final: bool = False) -> int:
        n = len(text)
        while pos < n and not self.done:
            state = self.state
            if state in (_VALUE, _OBJ_FIRST, _OBJ_KEY, _COLON, _ARR_FIRST, _AFTER):
                pos = _WS.match(text, pos).end()
                if pos >= n:
                    break
            ch = text[pos]
            if state == _VALUE:
                if ch in "{[":
                    self._open(ch)
                elif ch == '"':
                    self._emit('"')
                    if not self.stack:
                        self._string = []
                    self.state = _STRING
                elif ch == "-" or ch.isdigit():
                    self.state = _NUMBER_S
                    continue
                elif ch in "tfn":
                    self.state = _LITERAL
                    continue
                else:
                    raise JsonStreamError(f"unexpected {ch!r} where a value should start")
                pos += 1
            elif state in (_OBJ_FIRST, _OBJ_KEY):
                if ch == "}" and state == _OBJ_FIRST:
                    self._close("}")
                elif ch == '"':
                    self._in_key, self._key, self.state = True, [], _STRING
                else:
                    raise JsonStreamError(f"unexpected {ch!r} where a key should be")
                pos += 1
            elif state == _COLON:
                if ch != ":":
                    raise JsonStreamError(f"unexpected {ch!r} where ':' should be")
                self._emit(json.dumps(self._pending_key, ensure_ascii=False) + ": ")
                self.state = _VALUE
                pos += 1
            elif state == _ARR_FIRST:
                if ch == "]":
                    self._close("]")
                    pos += 1
                else:
                    self.state = _VALUE
            elif state == _AFTER:
                top = self.stack[-1]
                if ch == ",":
                    self._emit(", ")
                    self.state = _VALUE if top is None else _OBJ_KEY
                elif ch == "}" and top is not None:
                    self._close("}")
                elif ch == "]" and top is None:
                    self._close("]")
                else:
                    raise JsonStreamError(f"unexpected {ch!r} after a value")
                pos += 1
            elif state == _STRING:
                end = _PLAIN.match(text, pos).end()
                if end > pos:
                    if self._high is not None:
                        raise JsonStreamError("lone surrogate escape in a string")
                    self._string_chars(text[pos:end])
                    pos = end
                    continue
                if ch == '"':
                    self._end_string()
                elif ch == "\\":
                    self.state = _ESCAPE
                else:
                    raise JsonStreamError("control character in a string")
                pos += 1
            elif state == _ESCAPE:
                if ch == "u":
                    self._buf, self.state = "", _UNICODE
                elif ch in _ESCAPES:
                    if self._high is not None:
                        raise JsonStreamError("lone surrogate escape in a string")
                    self._string_chars(_ESCAPES[ch])
                    self.state = _STRING
                else:
                    raise JsonStreamError(f"invalid escape \\{ch}")
                pos += 1
            elif state == _UNICODE:
                if ch not in _HEX:
                    raise JsonStreamError("invalid \\u escape")
                self._buf += ch
                pos += 1
                if len(self._buf) == 4:
                    self._code_point(int(self._buf, 16))
                    self._buf = ""
                    self.state = _STRING
            elif state == _NUMBER_S:
                end = _NUMBER_CHARS.match(text, pos).end()
                self._buf += text[pos:end]
                pos = end
                if len(self._buf) > 4096:
                    raise JsonStreamError("number too long")
                if pos < n:
                    self._finish_number()
            elif state == _LITERAL:
                self._buf += ch
                pos += 1
                if not any(lit.startswith(self._buf) for lit in _LITERALS):
                    raise JsonStreamError(f"invalid literal {self._buf!r}")
                if self._buf in _LITERALS:
                    self._emit(self._buf)
                    self._buf = ""
                    self._value_done()
        if final and not self.done:
            if self.state == _NUMBER_S and not self.stack and self._buf:
                self._finish_number()
            else:
                raise JsonStreamError("the JSON value is incomplete")
        return pos

    def _code_point(self, cp: int) -> None:
        if 0xD800 <= cp <= 0xDBFF:
            if self._high is not None:
                raise JsonStreamError("lone surrogate escape in a string")
            self._high = cp
            return
        if 0xDC00 <= cp <= 0xDFFF:
            if self._high is None:
                raise JsonStreamError("lone surrogate escape in a string")
            cp = 0x10000 + ((self._high - 0xD800) << 10) + (cp - 0xDC00)
            self._high = None
        elif self._high is not None:
            raise JsonStreamError("lone surrogate escape in a string")
        self._string_chars(chr(cp))


def canonical_json(text: str) -> str:
    """``text`` (one JSON value, surrounding whitespace allowed) written as the stream writes it."""
    stream = JsonValueStream()
    end = stream.feed(text, 0, final=True)
    if text[end:].strip():
        raise JsonStreamError("extra data after the JSON value")
    return stream.take()
