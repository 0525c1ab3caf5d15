"""Streamed tool calls: for every tool-call format, the deltas of a growing text (fed in pieces of many sizes)
reassemble to the non-streamed answer, calls are announced in OpenAI's shape, and hostile partial JSON never
raises, never sends arguments that are not a JSON prefix, and costs linear time (pure Python, no model)."""

from __future__ import annotations

import json
import time

import pytest
from llmctl_server.chat_output import ChatChoiceOutput, ToolMode
from llmctl_server.tools.call_stream import ToolCallStreamer
from llmctl_server.tools.json_stream import JsonStreamError, JsonValueStream, canonical_json
from llmctl_server.tools.parsers import get_tool_parser

STEPS = (1, 2, 3, 5, 8, 13, 1000)


def _mode(fmt: str) -> ToolMode:
    return ToolMode("required") if fmt == "required" else ToolMode("auto", parser=get_tool_parser(fmt))


def _stream(fmt: str, text: str, step: int):
    """Feed ``text`` in ``step``-character pieces; returns (content, calls, finished calls, first deltas)."""
    out = ChatChoiceOutput(mode=_mode(fmt))
    content, calls, firsts, final = "", {}, {}, []
    ends = list(range(step, len(text), step)) + [len(text)]
    for end in ends:
        delta, done_calls = out.delta(text[:end], end == len(text))
        content += delta.get("content", "")
        for tc in delta.get("tool_calls", []):
            if tc["index"] not in calls:
                firsts[tc["index"]] = tc
                assert tc["type"] == "function" and tc["id"].startswith("call_") and tc["function"]["name"]
                calls[tc["index"]] = {"name": tc["function"]["name"], "arguments": ""}
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
            calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
        final = done_calls
    assert sorted(calls) == list(range(len(calls)))
    return content, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())], final, firsts


WELL_FORMED = [
    ("hermes", 'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
               '\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'),
    ("hermes", '\n<tool_call>\n{"arguments": {"q": "caf\\u00e9 \\"x\\" \\ud83d\\ude00\\n", "n": [1, 2.50, -3e2, '
               'true, null, {"a": {}}]}, "name": "search", "extra": [1]}\n</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'),  # arguments as a JSON string
    ("hermes", '<tool_call>{"name":"f","arguments":{"x":[ ]  ,"y" :{ }}}'),  # no end tag on the last call
    ("hermes", '<tool_call>{"name": "noargs"}</tool_call>'),
    ("mistral", 'ok [TOOL_CALLS] [{"name": "a", "arguments": {"k": "v"}}, {"name": "b", "arguments": {"z": 0}}]'),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"k": 1}}; {"name": "b", "parameters": {}}'),
    ("llama3_json", '  {"name": "only", "parameters": {"deep": {"x": [[1], [2, {"y": "\\u00fc"}]]}}}'),
    ("pythonic", '[get_weather(city="Paris", days=3), get_time(), f(x=[1, (2, 3)], y={"k": None}, z=True)]'),
    ("pythonic", "<|python_start|>[f(s='a,b)c', t='''tri\"ple''', u=-1.5)]<|python_end|>"),
    ("required", '[{"name": "get_weather", "parameters": {"city": "Rome", "days": 2}}, '
                 '{"name": "get_time", "parameters": {"zone": "utc"}}]'),
    ("required", '[ {"parameters": {"zone": "cet"}, "name": "get_time"} ]'),
]


@pytest.mark.parametrize(("fmt", "text"), WELL_FORMED)
def test_stream_reassembles_to_the_non_streamed_answer(fmt, text):
    whole = ChatChoiceOutput(mode=_mode(fmt)).final(text)
    assert whole.calls, "the example must parse as calls"
    expected = [(c.name, c.arguments) for c in whole.calls]
    for c in whole.calls:
        json.loads(c.arguments)
    for step in STEPS:
        content, calls, final, _ = _stream(fmt, text, step)
        assert calls == expected, step
        assert [(c.name, c.arguments) for c in final] == expected
        assert content == (whole.content or ""), step


def test_arguments_arrive_in_fragments_before_the_call_ends():
    text = '<tool_call>{"name": "write", "arguments": {"body": "' + "word " * 40 + '"}}</tool_call>'
    out = ChatChoiceOutput(mode=_mode("hermes"))
    fragments = []
    for end in range(4, len(text) + 1, 4):
        delta, _ = out.delta(text[:end], end == len(text))
        fragments += [tc["function"]["arguments"] for tc in delta.get("tool_calls", []) if tc["function"].get(
            "arguments")]
    assert len(fragments) > 20  # the long string streams as it is written, not whole at the end
    assert "".join(fragments) == json.dumps({"body": "word " * 40}, ensure_ascii=False)


def test_finish_reason_follows_the_parse():
    out = ChatChoiceOutput(mode=_mode("hermes"))
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    _, calls = out.delta(text, True)
    assert out.finish_reason(calls, "stop") == "tool_calls"
    out = ChatChoiceOutput(mode=_mode("hermes"))
    _, calls = out.delta('<tool_call>{"name": "f", "arguments": {"a": ', True)  # cut off by max_tokens
    assert calls == [] and out.finish_reason(calls, "length") == "length"


HOSTILE = [
    ("hermes", 'Sure <tool_call>{"name": "f", "arguments": {"x": </tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": 1, "x": 2}}</tool_call>'),  # duplicate key
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": 1e999}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": "\\ud800"}}</tool_call>'),  # lone surrogate
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": "a\nb"}}</tool_call>'),  # raw control character
    ("hermes", '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}, "parameters": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": 5, "arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call> and then some prose'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 01}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call>'),
    ("hermes", '<tool_call>' + '{"a": ' * 300 + '1' + '}' * 300 + '</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": [' + '[' * 500 + ']' * 500 + ']}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": "\\q"}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": "\\u12"}}</tool_call>'),
    ("mistral", '[TOOL_CALLS] [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {'),
    ("mistral", '[TOOL_CALLS] []'),
    ("llama3_json", '{"answer": 42}'),
    ("llama3_json", '{"name": "a", "parameters": {}} trailing'),
    ("pythonic", '[f(1, 2)]'),
    ("pythonic", '[f(a=__import__("os").system("x"))]'),
    ("pythonic", '[f(a=1, a=2)]'),
    ("pythonic", '[f(a=float("nan"))]'),
    ("pythonic", '[f(a={1, 2})]'),
    ("pythonic", "[f(a='unterminated)]"),
    ("required", '[{"name": "get_time"}]'),
    ("required", '[{"name": "get_time", "parameters": {"zone": "utc"}'),
]


def _is_json_prefix(text: str) -> bool:
    try:
        JsonValueStream().feed(text, 0)
    except JsonStreamError:
        return False
    return True


@pytest.mark.parametrize(("fmt", "text"), HOSTILE)
def test_hostile_text_never_raises_and_sends_only_json_prefixes(fmt, text):
    whole = ChatChoiceOutput(mode=_mode(fmt)).final(text)
    assert whole.calls == [] and whole.content == text  # non-streamed: a broken answer is plain content
    for step in STEPS:
        content, calls, final, _ = _stream(fmt, text, step)
        assert final == []
        for _, args in calls:
            assert _is_json_prefix(args)
        if not calls:
            assert content.strip() == text.strip()
        else:
            # the broken part goes out as content (after any prose, less the whitespace before the call)
            tail = content[content.find("<tool_call>"):] if "<tool_call>" in content else content
            assert content and text.endswith(tail), content


def test_eval_is_never_reached():
    text = '[f(a=__import__("builtins").exec("raise SystemExit"))]'
    for step in (1, 7, 100):
        _stream("pythonic", text, step)  # returns (as content) instead of running anything


def test_linear_time_on_long_adversarial_text():
    """Fed 64 characters at a time, 200 kB of open strings and brackets stay cheap: every character is read
    once (a parser that re-read the text per delta would do ~3000 passes here)."""
    body = '<tool_call>{"name": "f", "arguments": {"a": "' + "\\\\" * 50_000 + '", "b": ' + "[" * 100 + "]" * 100
    body += ', "c": "' + "x" * 100_000
    streamer = ToolCallStreamer("hermes")
    t0 = time.perf_counter()
    for end in range(64, len(body), 64):
        streamer.feed(body[:end], False)
    streamer.feed(body, True)
    assert time.perf_counter() - t0 < 10.0


@pytest.mark.parametrize("text", ['{"a": 1, "b": [1.0, 2e3, -0, "\\u00e9\\t"], "c": {"d": null}}', '"x"', "12",
                                  '[]', ' { } '])
def test_canonical_json_is_what_json_round_trips_to(text):
    assert canonical_json(text) == json.dumps(json.loads(text), ensure_ascii=False)


def _random_value(rng, depth=0):
    kind = rng.randrange(7 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([0, -1, 7, 3.25, -0.5, 1e21, 12345678901234567890])
    if kind == 1:
        chars = ['a', 'é', '"', '\\', '\n', '😀', ' ', '/', '\u2028', 'z']
        return "".join(rng.choice(chars) for _ in range(rng.randrange(6)))
    if kind == 2:
        return rng.choice([True, False, None])
    if kind in (3, 4):
        return rng.choice(["x", "y", 5])
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {f"k{i}": _random_value(rng, depth + 1) for i in range(rng.randrange(3))}


def _random_answer(rng, fmt):
    calls = [(rng.choice(["f", "get_x", "tool_2"]), {f"a{i}": _random_value(rng) for i in range(rng.randrange(3))})
             for _ in range(rng.randrange(1, 3))]
    sep = rng.choice([" ", "", "\n", ", "])

    def obj(name, args, key="arguments"):
        return json.dumps({"name": name, key: args}, ensure_ascii=rng.random() < 0.5,
                          separators=(",", ":") if rng.random() < 0.5 else None)

    if fmt == "hermes":
        return rng.choice(["", "Sure. "]) + "\n".join(f"<tool_call>{obj(n, a)}</tool_call>" for n, a in calls)
    if fmt == "mistral":
        return "[TOOL_CALLS] [" + sep.join(obj(n, a) + "," for n, a in calls).rstrip(",") + "]"
    if fmt == "llama3_json":
        return "; ".join(obj(n, a, "parameters") for n, a in calls)
    return "[" + ", ".join(obj(n, a, "parameters") for n, a in calls) + "]"  # required


def _mutate(rng, text):
    if not text:
        return text
    i = rng.randrange(len(text))
    op = rng.randrange(4)
    if op == 0:
        return text[:i]  # cut off
    if op == 1:
        return text[:i] + text[i + 1:]
    if op == 2:
        return text[:i] + rng.choice(['"', "{", "}", ",", ":", "]", "\\", "x", " "]) + text[i:]
    return text


@pytest.mark.parametrize("fmt", ["hermes", "mistral", "llama3_json", "required"])
def test_differential_fuzz_against_the_non_streamed_parse(fmt):
    """Random calls (escapes, unicode, nesting, numbers) and random damage to them: whatever the non-streamed
    parse makes of a text, the stream agrees (same calls, or no finished calls and only JSON prefixes sent)."""
    import random

    rng = random.Random(fmt)
    agreed = 0
    for _ in range(150):
        text = _random_answer(rng, fmt)
        if rng.random() < 0.5:
            text = _mutate(rng, text)
        whole = ChatChoiceOutput(mode=_mode(fmt)).final(text)
        expected = [(c.name, c.arguments) for c in whole.calls]
        for step in (1, 4, 9):
            content, calls, final, _ = _stream(fmt, text, step)
            if expected:
                assert calls == expected and [(c.name, c.arguments) for c in final] == expected, (text, step)
                assert content == (whole.content or "")
                agreed += 1
            else:
                assert final == [], (text, step)
                assert all(_is_json_prefix(a) for _, a in calls), (text, step)
    assert agreed > 100
