"""Reasoning and tool-call extraction on synthetic model texts: fed whole, and fed as a growing stream whose
deltas must add up to the whole answer (pure Python, no model)."""

from __future__ import annotations

import json

import pytest
from llmctl_server.chat_output import ChatChoiceOutput, ToolMode
from llmctl_server.reasoning import get_reasoning_parser
from llmctl_server.tools.parsers import get_tool_parser


def _stream(out: ChatChoiceOutput, text: str, step: int = 3):
    reasoning, content, calls = "", "", {}
    for end in list(range(step, len(text), step)) + [len(text)]:
        delta, _ = out.delta(text[:end], end == len(text))
        reasoning += delta.get("reasoning_content", "")
        content += delta.get("content", "")
        for tc in delta.get("tool_calls", []):
            slot = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
            slot["name"] += tc.get("function", {}).get("name", "") or ""
            slot["arguments"] += tc.get("function", {}).get("arguments", "") or ""
    return reasoning, content, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]


@pytest.mark.parametrize(("parser", "text", "reasoning", "content"), [
    ("qwen3", "<think>plan a, then b</think>\n\nThe answer is 4.", "plan a, then b", "The answer is 4."),
    ("qwen3", "No thinking here.", None, "No thinking here."),
    ("deepseek_r1", "still thinking</think>Done.", "still thinking", "Done."),
    ("deepseek_r1", "thinking and cut off", "thinking and cut off", ""),
])
def test_reasoning_split_whole_and_streamed(parser, text, reasoning, content):
    out = ChatChoiceOutput(reasoner=get_reasoning_parser(parser))
    msg = out.final(text)
    assert (msg.reasoning, msg.content) == (reasoning, content)
    for step in (1, 2, 5):
        got = _stream(ChatChoiceOutput(reasoner=get_reasoning_parser(parser)), text, step)
        assert got[:2] == (reasoning or "", content)


def test_hermes_auto_streams_content_then_calls():
    text = ('Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    mode = ToolMode("auto", parser=get_tool_parser("hermes"))
    whole = ChatChoiceOutput(mode=mode).final(text)
    assert whole.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == [("get_weather", {"city": "Oslo"}),
                                                                        ("get_time", {})]
    for step in (1, 4, 7):
        _, content, calls = _stream(ChatChoiceOutput(mode=mode), text, step)
        assert content == "Let me check." and calls == [(c.name, c.arguments) for c in whole.calls]


def test_malformed_call_streams_back_as_content():
    """Broken before its name is read, a call was never announced: the whole answer is content, as non-streamed.
    Broken after, the announced part stays (a JSON prefix) and the broken call's text follows as content."""
    mode = ToolMode("auto", parser=get_tool_parser("hermes"))
    text = 'Sure <tool_call>{"nam": 5 </tool_call>'
    assert ChatChoiceOutput(mode=mode).final(text).content == text
    assert _stream(ChatChoiceOutput(mode=mode), text, 3) == ("", text, [])
    text = 'Sure <tool_call>{"name": "f", "arguments": {"x": </tool_call>'
    assert ChatChoiceOutput(mode=mode).final(text).content == text
    _, content, calls = _stream(ChatChoiceOutput(mode=mode), text, 3)
    assert calls == [("f", '{"x": ')] and content == 'Sure<tool_call>{"name": "f", "arguments": {"x": </tool_call>'


def test_reasoning_then_named_call():
    text = '<think>need the time</think>{"zone": "utc"}'
    out = ChatChoiceOutput(mode=ToolMode("named", name="get_time"), reasoner=get_reasoning_parser("qwen3"))
    msg = out.final(text)
    assert msg.reasoning == "need the time" and [(c.name, c.arguments) for c in msg.calls] == \
        [("get_time", '{"zone": "utc"}')]
    reasoning, content, calls = _stream(ChatChoiceOutput(mode=ToolMode("named", name="get_time"),
                                                         reasoner=get_reasoning_parser("qwen3")), text, 2)
    assert reasoning == "need the time" and calls == [("get_time", '{"zone": "utc"}')] and content == ""
