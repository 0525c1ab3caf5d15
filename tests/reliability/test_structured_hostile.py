"""Hostile structured-output and tool-calling input: every bad constraint is a 400 within 5 s that names the
field, the engine keeps serving the requests running beside it, and parsers stay linear and never evaluate."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import pytest
from llmctl.structured_output.limits import MAX_SCHEMA_BYTES
from llmctl_server import ServerSettings
from llmctl_server.tools.choice import MAX_TOOLS, MAX_TOOLS_BYTES
from llmctl_server.tools.parsers import get_tool_parser

from tests.reliability.conftest import build_engine
from tests.test_server_support import start_server, wait_kv_free

MSG = [{"role": "user", "content": "hi"}]
BAD = [
    ("invalid schema", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, "response_format"),
    ("schema not JSON", {"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ("unsupported keyword", {"guided_json": {"type": "array", "uniqueItems": True}}, "guided_json"),
    ("nested repetition", {"guided_regex": "((a{1,1000}){1,1000})"}, "guided_regex"),
    ("catastrophic backtracking", {"guided_regex": "^(a+)+$"}, "catastrophic"),
    ("catastrophic in a schema pattern", {"guided_json": {"type": "string", "pattern": "(x+x+)+y"}}, "catastrophic"),
    ("regex over cap", {"guided_regex": "(a|b)" * 4000}, "guided_regex"),
    ("backreference", {"structured_outputs": {"regex": r"(a)\1"}}, "structured_outputs.regex"),
    ("bad grammar", {"guided_grammar": "root ::= foo"}, "guided_grammar"),
    ("two forms", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ("options and no constraint", {"structured_outputs": {"disable_any_whitespace": True}}, "exactly one of"),
    ("possessive quantifier", {"guided_regex": "a++a"}, "possessive"),
    ("refused by both engines", {"guided_regex": r"\bword\b"}, "guided_regex"),
    ("no engine enforces it", {"guided_json": {"type": "integer", "not": {"const": 3}}}, "'not'"),
    ("unknown engine", {"guided_regex": "a", "guided_decoding_backend": "outlines"}, "auto, xgrammar, guidance"),
    ("unknown engine in structured_outputs", {"structured_outputs": {"regex": "a", "backend": "lm-format-enforcer"}},
     "structured_outputs.backend"),
    ("huge count", {"guided_json": {"type": "string", "maxLength": 10**9}}, "guided_json"),
    ("schema over cap", {"guided_json": {"type": "object", "properties": {
        f"p{i}": {"type": "string", "description": "x" * 100} for i in range(MAX_SCHEMA_BYTES // 100)}}},
     str(MAX_SCHEMA_BYTES)),
    ("too many tools", {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)],
                        "tool_choice": "required"}, str(MAX_TOOLS)),
    ("tools over byte cap", {"tools": [{"type": "function", "function": {
        "name": "f", "description": "x" * MAX_TOOLS_BYTES}}], "tool_choice": "required"}, str(MAX_TOOLS_BYTES)),
    ("unknown named tool", {"tools": [{"type": "function", "function": {"name": "f"}}],
                            "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ("auto without parser", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"},
     "tool_choice"),
]


@pytest.fixture(scope="module", params=["auto", "xgrammar", "guidance"])
def hostile_server(request, tiny_llama_dir):
    engine = build_engine(tiny_llama_dir, max_num_seqs=8, structured_outputs_backend=request.param)
    srv = start_server(engine, ServerSettings(served_model_names=["tiny"]))
    yield srv
    srv.stop()
    engine.shutdown()


def test_bad_constraints_are_fast_400s_beside_a_running_request(hostile_server):
    async def run():
        async with httpx.AsyncClient(base_url=hostile_server.base, timeout=60) as c:
            running = asyncio.create_task(c.post("/completions", json={
                "model": "tiny", "prompt": "Count:", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                "guided_regex": "[0-9 ]{1,200}"}))
            for name, extra, needle in BAD:
                t0 = time.monotonic()
                r = await c.post("/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 4,
                                                              **extra})
                took = time.monotonic() - t0
                assert r.status_code == 400, (name, r.status_code, r.text[:300])
                assert took < 5, (name, took)
                assert needle in r.text, (name, r.text[:300])
            done = await running
            assert done.status_code == 200 and done.json()["choices"][0]["text"]
    asyncio.run(run())
    wait_kv_free(hostile_server.engine)


def test_compile_deadline(hostile_server):
    """A compile that overruns its deadline is a 400 naming the field (under auto too: running out of time is no
    reason to try the other engine); the next request is served normally."""
    manager = hostile_server.engine.engine.structured_output
    backend = manager.backend
    real_compile = backend.compile

    def slow_compile(params):  # a grammar that compiles slowly, whatever the backend and the host's speed
        time.sleep(1.0)
        return real_compile(params)

    old = manager.compile_timeout
    manager.compile_timeout = 0.1
    backend.compile = slow_compile
    try:
        schema = {"type": "object", "properties": {f"deadline{i}": {"type": "integer"} for i in range(40)}}
        t0 = time.monotonic()
        r = httpx.post(hostile_server.base + "/completions", timeout=30, json={
            "model": "tiny", "prompt": "x", "max_tokens": 4, "guided_json": schema})
        assert r.status_code == 400 and "took longer than" in r.text and "guided_json" in r.text, r.text
        assert time.monotonic() - t0 < 5
    finally:
        manager.compile_timeout = old
        backend.compile = real_compile
    r = httpx.post(hostile_server.base + "/completions", timeout=30, json={
        "model": "tiny", "prompt": "x", "max_tokens": 4, "guided_choice": ["ok", "fine"]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("ok", "fine")
    info = manager.cache_info()
    assert info["entries"] <= manager.max_cache_entries and info["bytes"] <= manager.max_cache_bytes



def test_slow_compile_never_stalls_other_requests(hostile_server):
    """A compile in progress holds back only its own request: an unconstrained request sent while the compile is
    held open is answered (the event loop and the engine loop never wait on a compile), then the held request is
    served with its constraint."""
    manager = hostile_server.engine.engine.structured_output
    backend = manager.backend
    real_compile = backend.compile
    started, release = threading.Event(), threading.Event()

    def held_compile(params):
        started.set()
        release.wait(60)
        return real_compile(params)

    old = manager.compile_timeout
    manager.compile_timeout = 120
    backend.compile = held_compile
    regex = "[0-9]{1,4}held"  # not compiled before in this module: the compile really runs

    async def run():
        async with httpx.AsyncClient(base_url=hostile_server.base, timeout=90) as c:
            held = asyncio.create_task(c.post("/completions", json={
                "model": "tiny", "prompt": "x", "max_tokens": 12, "guided_regex": regex}))
            assert await asyncio.to_thread(started.wait, 60)
            other = await c.post("/completions", json={"model": "tiny", "prompt": "Count:", "max_tokens": 8,
                                                       "temperature": 0, "ignore_eos": True})
            assert other.status_code == 200 and other.json()["usage"]["completion_tokens"] == 8
            assert not held.done()
            release.set()
            return await held
    try:
        r = asyncio.run(run())
    finally:
        release.set()
        backend.compile = real_compile
        manager.compile_timeout = old
    assert r.status_code == 200 and re.fullmatch(regex, r.json()["choices"][0]["text"]), r.text


ADVERSARIAL = {
    "hermes": ["<tool_call>" * 20000, "<tool_call>{" * 20000, '<tool_call>{"name": "f", "arguments": ' + "[" * 50000,
               "<tool_call>not json</tool_call>", '<tool_call>{"name": 5}</tool_call>'],
    "llama3_json": ["{" * 50000, '{"name": "f", "parameters": ' + "[" * 50000, '{"name": "f"} junk', "{;" * 20000],
    "mistral": ["[TOOL_CALLS]" * 20000, "[TOOL_CALLS] [" + "[" * 50000, "[TOOL_CALLS] {}"],
    "pythonic": ["[" * 50000, "[f(" * 20000, "[__import__('os').system('echo pwned')]", "[f(x=open('/etc/passwd'))]",
                 "[f(*a)]", "[f(**{'a': 1})]", "[(lambda: 1)()]", "[f(x=" + "1" * 100000 + ")]"],
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_parsers_are_linear_and_never_evaluate(name):
    parser = get_tool_parser(name)
    for text in ADVERSARIAL[name]:
        t0 = time.monotonic()
        out = parser.parse(text)
        assert time.monotonic() - t0 < 1.0, (name, text[:40])
        assert out.calls == [] and out.content == text, (name, text[:40])  # malformed: plain content


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_streamed_parsers_are_linear_and_never_evaluate(name):
    """The same texts streamed 256 characters at a time: each character is read once, nothing is evaluated, and
    no finished call comes out of a malformed answer."""
    from llmctl_server.tools.call_stream import ToolCallStreamer

    for text in ADVERSARIAL[name]:
        streamer = ToolCallStreamer(name)
        t0 = time.monotonic()
        sent = ""
        for end in list(range(256, len(text), 256)) + [len(text)]:
            update = streamer.feed(text[:end], end == len(text))
            sent += update.content
        assert time.monotonic() - t0 < 2.0, (name, text[:40])
        assert update.calls == [], (name, text[:40])
        assert text.endswith(sent) or sent.strip() == text.strip(), (name, text[:40])


def test_parsers_read_well_formed_calls():
    expected = [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "utc"})]
    texts = {
        "hermes": 'Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}</tool_call>\n'
                  '<tool_call>{"name": "get_time", "arguments": {"zone": "utc"}}</tool_call>',
        "llama3_json": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; '
                       '{"name": "get_time", "parameters": {"zone": "utc"}}',
        "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
                   '{"name": "get_time", "arguments": {"zone": "utc"}}]',
        "pythonic": '[get_weather(city="Paris", days=2), get_time(zone="utc")]',
    }
    for name, text in texts.items():
        out = get_tool_parser(name).parse(text)
        assert [(c.name, json.loads(c.arguments)) for c in out.calls] == expected, name
    assert get_tool_parser("hermes").parse(texts["hermes"]).content == "Sure."
