"""Structured output, tool calling and reasoning output through the server, with the official openai client.

Outputs are checked against their own constraints with the reference libraries (``jsonschema``, ``re``), and
streamed answers against non-streamed ones; the tiny random model makes the constraint do all the work.
"""

from __future__ import annotations

import asyncio
import json
import random
import re

import jsonschema
import openai
import pytest
from llmctl import LLM, AsyncLLM, EngineArgs, SamplingParams
from llmctl.structured_output import GuidedDecodingParams, StructuredOutputsParams
from llmctl_server import ServerSettings

from tests.test_server_support import start_server

KV = 64 << 20
# A Hermes/Qwen-style template: tools in the system turn, calls as <tool_call> JSON, tool results as turns.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.tool_calls %}{% for tc in m.tool_calls %}<tool_call>"
    "{{ {'name': tc.function.name, 'arguments': tc.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{%- else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet", "pst"]}}, "required": ["zone"],
    "additionalProperties": False}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def so_engine(tiny_llama_dir):
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(tiny_llama_dir), kv_cache_memory=KV, seed=0,
                                                  dtype="float32"))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def so_server(so_engine):
    srv = start_server(so_engine, ServerSettings(served_model_names=["tiny"], chat_template=TOOL_TEMPLATE,
                                                 enable_auto_tool_choice=True, tool_call_parser="hermes"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(so_server):
    return openai.OpenAI(base_url=so_server.base, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(so_server):
    """A factory: an async client is bound to the event loop it first runs on, and each test runs its own."""
    return lambda: openai.AsyncOpenAI(base_url=so_server.base, api_key="unused", max_retries=0, timeout=120)


def _gen_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random bounded schema: every string, array and number has limits so a grammar can always finish."""
    kinds = ["integer", "number", "string", "enum", "boolean", "pattern", "array"] + (["object"] if depth < 2 else [])
    props, required = {}, []
    for i in range(rng.randint(1, 3)):
        kind = rng.choice(kinds)
        if kind == "integer":
            lo = rng.randint(-50, 50)
            s = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 200)}
        elif kind == "number":
            s = {"type": "number", "minimum": -10, "maximum": 10}
        elif kind == "string":
            s = {"type": "string", "minLength": 1, "maxLength": rng.randint(1, 6)}
        elif kind == "enum":
            s = {"enum": rng.sample(["red", "green", "blue", "cyan", 3, None], rng.randint(1, 4))}
        elif kind == "boolean":
            s = {"type": "boolean"}
        elif kind == "pattern":
            s = {"type": "string", "pattern": "^[a-f]{1,4}-[0-9]{2}$"}
        elif kind == "array":
            s = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                 "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}
        else:
            s = _gen_schema(rng, depth + 1)
        name = f"f{i}_{kind}"
        props[name] = s
        if rng.random() < 0.7:
            required.append(name)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


async def _chat(aclient, content: str, **kw):
    return await aclient.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                 **kw)


# -- structured output -----------------------------------------------------------------------------------------------
def test_thirty_generated_schemas_validate(aclient):
    rng = random.Random(1234)
    schemas = [_gen_schema(rng) for _ in range(30)]

    async def one(ac, i, schema):
        # a random model pads JSON with whitespace forever unless the grammar fixes the separators
        so = {"json": schema, "disable_any_whitespace": True}
        return await _chat(ac, f"Give me object {i}", temperature=0.9, seed=i, max_tokens=96,
                           extra_body={"structured_outputs": so})

    async def all_of():
        async with aclient() as ac:
            return await asyncio.gather(*(one(ac, i, s) for i, s in enumerate(schemas)))

    results = asyncio.run(all_of())
    stopped = 0
    for schema, r in zip(schemas, results):
        choice = r.choices[0]
        if choice.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(choice.message.content), schema)
    assert stopped >= 24, f"only {stopped}/30 finished within max_tokens"


def test_regex_choice_grammar_and_guided_fields(aclient):
    regex = r"[a-c]{2,5}-\d{1,3}"
    choices = ["yes", "no", "maybe later"]
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    grammar_re = r"\((?:[1-9][0-9]?)(?:\+[1-9][0-9]?)*\)"

    async def run():
        async with aclient() as ac:
            return await asyncio.gather(*jobs(ac))

    def jobs(ac):
        jobs = []
        for i in range(6):
            jobs.append(ac.completions.create(model="tiny", prompt=f"Code {i}:", temperature=1.0, seed=i,
                                                   max_tokens=24, extra_body={"structured_outputs": {"regex": regex}}))
            jobs.append(_chat(ac, f"Pick {i}", temperature=1.0, seed=i, max_tokens=16,
                              extra_body={"guided_choice": choices}))
            jobs.append(ac.completions.create(model="tiny", prompt=f"Sum {i}:", temperature=1.0, seed=i,
                                                   max_tokens=40, extra_body={"guided_grammar": grammar}))
        return jobs

    results = asyncio.run(run())
    for i in range(0, len(results), 3):
        rx, ch, gr = results[i].choices[0], results[i + 1].choices[0], results[i + 2].choices[0]
        assert rx.finish_reason == "stop" and re.fullmatch(regex, rx.text), rx.text
        assert ch.finish_reason == "stop" and ch.message.content in choices
        if gr.finish_reason == "stop":
            assert re.fullmatch(grammar_re, gr.text), gr.text
        else:
            assert re.fullmatch(r"\((?:[1-9][0-9]?\+?)*", gr.text), gr.text  # a valid prefix, cut by max_tokens


def test_json_object_on_completions_and_stream_agrees(client):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "b": {"type": "string", "maxLength": 5}},
              "required": ["a", "b"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    msgs = [{"role": "user", "content": "An object please"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, response_format=fmt, temperature=0,
                                          max_tokens=64)
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="tiny", messages=msgs, response_format=fmt, temperature=0, max_tokens=64, stream=True) if ch.choices)
    assert text == full.choices[0].message.content
    if full.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(text), schema)
    obj = client.completions.create(model="tiny", prompt="JSON:", max_tokens=48, temperature=0.7, seed=3,
                                    extra_body={"response_format": {"type": "json_object"}})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].text), (dict, list))


def test_every_request_form_on_both_endpoints(aclient):
    """Each way of asking, on the endpoint the earlier tests do not use it on."""
    schema = {"type": "object", "properties": {"k": {"enum": ["x", "y"]}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 50}},
              "required": ["k", "n"], "additionalProperties": False}
    grammar = 'root ::= "<" [a-c]+ ">"'
    compact = {"structured_outputs": {"disable_any_whitespace": True}}  # options only: they apply to the form given

    async def run():
        async with aclient() as ac:
            comp = dict(model="tiny", prompt="Go:", temperature=0.8, seed=3, max_tokens=40)
            jobs = [
                ac.completions.create(**comp, extra_body={"response_format": {
                    "type": "json_schema", "json_schema": {"name": "s", "schema": schema}}, **compact}),
                _chat(ac, "Go", temperature=0.8, seed=3, max_tokens=40, response_format={"type": "json_object"},
                      extra_body=compact),
                _chat(ac, "Go", temperature=0.8, seed=3, max_tokens=40, extra_body={"guided_json": schema,
                                                                                    **compact}),
                ac.completions.create(**comp, extra_body={"structured_outputs": {"choice": ["left", "right"]}}),
                _chat(ac, "Go", temperature=0.8, seed=3, max_tokens=20,
                      extra_body={"structured_outputs": {"grammar": grammar}}),
                ac.completions.create(**comp, extra_body={"structured_outputs": {"json_object": True,
                                                                                 "disable_any_whitespace": True}}),
            ]
            return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(run())
    texts = [r.choices[0].text if hasattr(r.choices[0], "text") else r.choices[0].message.content
             for r in results if not isinstance(r, Exception)]
    assert len(texts) == len(results), [r for r in results if isinstance(r, Exception)]
    finished = [r.choices[0].finish_reason == "stop" for r in results]
    if finished[0]:
        jsonschema.validate(json.loads(texts[0]), schema)
    if finished[1]:
        assert isinstance(json.loads(texts[1]), (dict, list))
    if finished[2]:
        jsonschema.validate(json.loads(texts[2]), schema)
    assert finished[3] and texts[3] in ("left", "right")
    assert re.fullmatch(r"<[a-c]+>" if finished[4] else r"<[a-c]*", texts[4]), texts[4]
    if finished[5]:
        assert isinstance(json.loads(texts[5]), (dict, list))
    assert sum(finished) >= 4


def test_streamed_completions_agree_with_non_streamed(client):
    for extra in ({"guided_regex": r"[a-f]{2,6}(-[0-9]{1,3}){1,3}"}, {"guided_choice": ["one", "two", "three"]},
                  {"guided_json": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                                   "maxItems": 4}}):
        kw = dict(model="tiny", prompt="Answer:", temperature=0, max_tokens=32, extra_body=extra)
        full = client.completions.create(**kw)
        streamed = "".join(ch.choices[0].text for ch in client.completions.create(**kw, stream=True) if ch.choices)
        assert streamed == full.choices[0].text and full.choices[0].text, extra


def test_offline_sampling_params(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), kv_cache_memory=KV, seed=0, dtype="float32")
    sp = SamplingParams(temperature=0.8, seed=5, max_tokens=20, n=2,
                        structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"]))
    out = llm.generate("Choose:", sp, use_tqdm=False)[0]
    assert [o.text in ("alpha", "beta") for o in out.outputs] == [True, True]
    old = SamplingParams(temperature=0, max_tokens=20, guided_decoding=GuidedDecodingParams(regex=r"\d{3}"))
    assert re.fullmatch(r"\d{3}", llm.generate("Number:", old, use_tqdm=False)[0].outputs[0].text)
    with pytest.raises(ValueError, match="structured_outputs.json"):
        SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "array", "uniqueItems": True}))


def test_auto_fallback_and_per_request_backend(client):
    """The server's default backend is auto: a regex xgrammar cannot read (named groups) is served by llguidance;
    the request can pick the engine (guided_decoding_backend, structured_outputs.backend), and then xgrammar's
    refusal is a 400 naming the field. Unknown engine names are 400s that list the allowed ones."""
    regex = r"(?P<word>[a-c]{2,4})-(?P<num>\d{1,3})"
    chat = dict(model="tiny", messages=[{"role": "user", "content": "Code?"}], temperature=0.9, max_tokens=24)
    for seed in range(3):
        r = client.chat.completions.create(**chat, seed=seed, extra_body={"structured_outputs": {"regex": regex}})
        assert r.choices[0].finish_reason == "stop" and re.fullmatch(regex, r.choices[0].message.content)
    c = client.completions.create(model="tiny", prompt="Code:", max_tokens=24, temperature=0.9, seed=1,
                                  extra_body={"guided_regex": regex, "guided_decoding_backend": "guidance"})
    assert c.choices[0].finish_reason == "stop" and re.fullmatch(regex, c.choices[0].text)
    for extra, field in [({"guided_regex": regex, "guided_decoding_backend": "xgrammar"}, "guided_regex"),
                         ({"structured_outputs": {"regex": regex, "backend": "xgrammar"}}, "structured_outputs.regex")]:
        with pytest.raises(openai.BadRequestError, match=re.escape(field)):
            client.chat.completions.create(**chat, extra_body=extra)
    for extra, field in [({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
                         ({"structured_outputs": {"regex": "a", "backend": "nope"}}, "structured_outputs.backend"),
                         ({"guided_regex": "a", "guided_decoding_backend": "guidance",
                           "structured_outputs": {"backend": "xgrammar"}}, "conflicting")]:
        with pytest.raises(openai.BadRequestError, match=re.escape(field)) as err:
            client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body=extra)
        assert "conflicting" in field or "auto, xgrammar, guidance" in str(err.value)
    # a tool whose parameters xgrammar would not enforce (allOf): llguidance under auto, a 400 under xgrammar
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "allOf": [{"required": ["n"]}], "additionalProperties": False}}}
    named = {"type": "function", "function": {"name": "pick"}}
    r = client.chat.completions.create(**{**chat, "temperature": 0}, tools=[tool], tool_choice=named)
    (call,) = r.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    with pytest.raises(openai.BadRequestError, match="allOf"):
        client.chat.completions.create(**chat, tools=[tool], tool_choice=named,
                                       extra_body={"guided_decoding_backend": "xgrammar"})


# -- tool calling -----------------------------------------------------------------------------------------------------
def _check_call(call):
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_tool_choice_required_and_named(client):
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, TIME], tool_choice="required",
                                       temperature=0.8, seed=1, max_tokens=120)
    choice = r.choices[0]
    if choice.finish_reason != "length":
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            _check_call(call)
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, TIME], tool_choice=named,
                                       temperature=0, max_tokens=40)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    _check_call(calls[0])
    # streamed: the arguments arrive as deltas of one call and add up to the non-streamed arguments
    args, names = "", set()
    for ch in client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, TIME], tool_choice=named,
                                             temperature=0, max_tokens=40, stream=True):
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            names.add(tc.function.name) if tc.function and tc.function.name else None
            args += (tc.function.arguments or "") if tc.function else ""
    assert names == {"get_time"} and args == calls[0].function.arguments


def test_required_and_named_need_no_parser_flag(so_engine):
    """As in OpenAI's API, ``required`` and a named function work on a server started without
    --enable-auto-tool-choice / --tool-call-parser; ``none`` keeps tools out of the answer."""
    srv = start_server(so_engine, ServerSettings(served_model_names=["tiny"], chat_template=TOOL_TEMPLATE))
    try:
        c = openai.OpenAI(base_url=srv.base, api_key="unused", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "Weather?"}]
        named = {"type": "function", "function": {"name": "get_weather"}}
        r = c.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, TIME], tool_choice=named,
                                      temperature=0.7, seed=3, max_tokens=60)
        assert r.choices[0].finish_reason == "stop"  # OpenAI's finish_reason for a named choice
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        _check_call(call)
        r = c.chat.completions.create(model="tiny", messages=msgs, tools=[TIME], tool_choice="required",
                                      temperature=0.7, seed=3, max_tokens=80)
        if r.choices[0].finish_reason != "length":
            assert r.choices[0].finish_reason == "tool_calls"
            for call in r.choices[0].message.tool_calls:
                _check_call(call)
        r = c.chat.completions.create(model="tiny", messages=msgs, tools=[TIME], tool_choice="none",
                                      temperature=0, max_tokens=6)
        assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason in ("stop", "length")
    finally:
        srv.stop()


def test_required_parallel_streamed_matches(client):
    msgs = [{"role": "user", "content": "Weather and time"}]
    kw = dict(model="tiny", messages=msgs, tools=[WEATHER, TIME], tool_choice="required", temperature=0,
              max_tokens=160)
    full = client.chat.completions.create(**kw)
    calls: dict[int, dict] = {}
    finish = None
    for ch in client.chat.completions.create(**kw, stream=True):
        if not ch.choices:
            continue
        finish = ch.choices[0].finish_reason or finish
        for tc in ch.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            slot["name"] += tc.function.name or ""
            slot["arguments"] += tc.function.arguments or ""
    assert finish == full.choices[0].finish_reason
    if finish == "tool_calls":
        assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
               [(c.function.name, c.function.arguments) for c in full.choices[0].message.tool_calls]
    no_parallel = client.chat.completions.create(**{**kw, "temperature": 0.9, "seed": 4},
                                                 parallel_tool_calls=False)
    if no_parallel.choices[0].finish_reason == "tool_calls":
        assert len(no_parallel.choices[0].message.tool_calls) == 1


def test_auto_with_hermes_parser_and_round_trip(client):
    msgs = [{"role": "user", "content": "Weather in Oslo for 2 days?"}]
    forced = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,6}", "days": [1-7]\}\}</tool_call>'
    kw = dict(model="tiny", messages=msgs, tools=[WEATHER], temperature=0.7, seed=2, max_tokens=80,
              extra_body={"structured_outputs": {"regex": forced}})
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    _check_call(call)
    streamed = [tc for ch in client.chat.completions.create(**kw, stream=True) if ch.choices
                for tc in ch.choices[0].delta.tool_calls or []]
    # the first delta announces the call, then argument fragments follow (more than one: they stream)
    assert streamed[0].id.startswith("call_") and streamed[0].function.name == call.function.name
    assert len(streamed) > 1 and all(t.index == 0 and not t.function.name for t in streamed[1:])
    assert "".join(t.function.arguments or "" for t in streamed) == call.function.arguments
    # unconstrained, the random model writes no call: plain content, finish_reason stop
    plain = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER], temperature=0,
                                           max_tokens=8)
    assert plain.choices[0].message.tool_calls == [] and plain.choices[0].message.content is not None
    # round trip: the call and its result go back through the template
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    again = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], temperature=0,
                                           max_tokens=8)
    assert again.choices[0].finish_reason in ("stop", "length")
    import httpx
    ids = httpx.post(str(client.base_url).replace("/v1/", "/tokenize"),
                     json={"model": "tiny", "messages": history}).json()["tokens"]
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=1).usage.prompt_tokens == len(ids)


def test_auto_parallel_calls_streamed_and_not(client):
    """Two calls in one answer read by the hermes parser (the random model is steered into the format with a
    regex): both come back, streamed as two indexed calls whose deltas add up to the non-streamed arguments."""
    one = r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "(utc|cet|pst)"\}\}</tool_call>'
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Time in two zones?"}], tools=[WEATHER, TIME],
              temperature=0.8, seed=5, max_tokens=240, extra_body={"structured_outputs": {"regex": one + "\n" + one}})
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls"
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 2 and len({c.id for c in calls}) == 2
    for call in calls:
        _check_call(call)
    streamed: dict[int, list[str]] = {}
    for ch in client.chat.completions.create(**kw, stream=True):
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            slot = streamed.setdefault(tc.index, ["", ""])
            slot[0] += (tc.function.name or "") if tc.function else ""
            slot[1] += (tc.function.arguments or "") if tc.function else ""
    assert [tuple(v) for _, v in sorted(streamed.items())] == [(c.function.name, c.function.arguments) for c in calls]


# -- reasoning --------------------------------------------------------------------------------------------------------
def test_reasoning_parser_streamed_and_not(so_engine, tiny_llama_dir):
    offline = LLM(model=str(tiny_llama_dir), kv_cache_memory=KV, seed=0, dtype="float32")
    srv = start_server(so_engine, ServerSettings(served_model_names=["tiny"], reasoning_parser="deepseek_r1"))
    try:
        c = openai.OpenAI(base_url=srv.base, api_key="unused", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "Think about it"}]
        r = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=12)
        reasoning = r.choices[0].message.reasoning_content  # no </think> from a random model: all reasoning
        prompt = offline.get_tokenizer().apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = offline.get_tokenizer().encode(prompt, add_special_tokens=False)
        expected = offline.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=12),
                                    use_tqdm=False)[0].outputs[0].text
        assert reasoning == expected and not r.choices[0].message.content
        parts = [ch.choices[0].delta for ch in c.chat.completions.create(model="tiny", messages=msgs, temperature=0,
                                                                         max_tokens=12, stream=True) if ch.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in parts) == reasoning
        assert not "".join(d.content or "" for d in parts)
        # a constraint applies to the content only: the reasoning before it is the same free text
        for extra in ({"guided_choice": ["yes", "no"]}, {"response_format": {"type": "json_object"}}):
            constrained = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=12,
                                                    extra_body=extra)
            assert constrained.choices[0].message.reasoning_content == reasoning
            assert not constrained.choices[0].message.content
    finally:
        srv.stop()


# -- Responses API ----------------------------------------------------------------------------------------------------
def test_responses_text_stream_and_structured(client):
    r = client.responses.create(model="tiny", input="Say something", max_output_tokens=10, temperature=0)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say something"}],
                                          max_tokens=10, temperature=0)
    assert r.object == "response" and r.output_text == chat.choices[0].message.content
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert r.usage.output_tokens == chat.usage.completion_tokens
    events = list(client.responses.create(model="tiny", input="Say something", max_output_tokens=10, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    s = client.responses.create(model="tiny", input=[{"role": "user", "content": "A number"}], temperature=0,
                                max_output_tokens=40, instructions="Answer in JSON",
                                text={"format": {"type": "json_schema", "name": "n", "schema": schema}})
    if s.status == "completed":
        jsonschema.validate(json.loads(s.output_text), schema)
    # vLLM's per-request engine choice reaches text.format too: xgrammar would not enforce a number's multipleOf
    halves = {"type": "object", "properties": {"x": {"type": "number", "multipleOf": 0.5, "minimum": 0,
                                                     "maximum": 3}}, "required": ["x"], "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "h", "schema": halves}}
    h = client.responses.create(model="tiny", input="A half", temperature=0, max_output_tokens=40, text=fmt,
                                extra_body={"guided_decoding_backend": "guidance"})
    if h.status == "completed":
        jsonschema.validate(json.loads(h.output_text), halves)
    with pytest.raises(openai.BadRequestError, match="multipleOf"):
        client.responses.create(model="tiny", input="A half", max_output_tokens=4, text=fmt,
                                extra_body={"guided_decoding_backend": "xgrammar"})


def test_responses_tools_and_store(client, so_engine):
    tool = {"type": "function", "name": "get_time", "parameters": TIME["function"]["parameters"]}
    r = client.responses.create(model="tiny", input="What time is it?", tools=[tool], tool_choice="required",
                                temperature=0, max_output_tokens=60)
    calls = [o for o in r.output if o.type == "function_call"]
    if r.status == "completed":
        assert calls and all(c.name == "get_time" for c in calls)
        jsonschema.validate(json.loads(calls[0].arguments), PARAMS["get_time"])
    streamed = list(client.responses.create(model="tiny", input="What time is it?", tools=[tool],
                                            tool_choice="required", temperature=0, max_output_tokens=60, stream=True))
    done = [e.item for e in streamed if e.type == "response.output_item.done" and e.item.type == "function_call"]
    if r.status == "completed":
        assert [(c.name, c.arguments) for c in done] == [(c.name, c.arguments) for c in calls]
    else:  # cut off: the calls streamed so far, the last one marked incomplete unless its arguments closed
        assert all(c.name == "get_time" for c in done)
        assert all(c.status == "completed" or c is done[-1] for c in done)
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="tiny", input="again", previous_response_id=r.id)
    srv = start_server(so_engine, ServerSettings(served_model_names=["tiny"], chat_template=TOOL_TEMPLATE,
                                                 responses_store_size=2))
    try:
        c = openai.OpenAI(base_url=srv.base, api_key="unused", max_retries=0, timeout=60)
        first = c.responses.create(model="tiny", input="What time is it?", tools=[tool], tool_choice="required",
                                   temperature=0, max_output_tokens=60, parallel_tool_calls=False)
        call = next(o for o in first.output if o.type == "function_call")
        follow = c.responses.create(model="tiny", previous_response_id=first.id, max_output_tokens=4, temperature=0,
                                    input=[{"type": "function_call_output", "call_id": call.call_id,
                                            "output": "12:00"}])
        history = [{"role": "user", "content": "What time is it?"},
                   {"role": "assistant", "content": None, "tool_calls": [{
                       "id": call.call_id, "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}}]},
                   {"role": "tool", "tool_call_id": call.call_id, "content": "12:00"}]
        same = c.chat.completions.create(model="tiny", messages=history, max_tokens=4, temperature=0)
        assert follow.previous_response_id == first.id
        assert follow.usage.input_tokens == same.usage.prompt_tokens  # the stored conversation was continued
        assert follow.output_text == same.choices[0].message.content
        for _ in range(2):  # the store keeps two: the first one is dropped
            c.responses.create(model="tiny", input="x", max_output_tokens=1)
        with pytest.raises(openai.NotFoundError):
            c.responses.create(model="tiny", input="again", previous_response_id=first.id)
    finally:
        srv.stop()
