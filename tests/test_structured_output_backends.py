"""Every grammar backend (xgrammar, llguidance as ``guidance``) through the offline engine: the same request
forms give outputs that validate with the reference libraries, the same bad input is a ``ValueError`` naming the
field within the deadline, and the backends agree on the allowed tokens where their grammars are the same.
Selecting a backend works under each of vLLM's spellings."""

from __future__ import annotations

import json
import random
import re
import time

import jsonschema
import pytest
import torch
from llmctl import LLM, EngineArgs, SamplingParams
from llmctl.structured_output import StructuredOutputsParams
from llmctl.structured_output.manager import StructuredOutputManager
from llmctl.structured_output.request_grammar import fill_grammar_bitmask

BACKENDS = ["xgrammar", "guidance"]
KV = 64 << 20
# The same language in each backend's grammar syntax: xgrammar takes EBNF (GBNF), llguidance Lark.
GRAMMARS = {
    "xgrammar": 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?',
    "guidance": 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/',
}
GRAMMAR_RE = r"\((?:[1-9][0-9]?)(?:\+[1-9][0-9]?)*\)"


@pytest.fixture(scope="module", params=BACKENDS)
def backend_llm(request, tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), kv_cache_memory=KV, seed=0, dtype="float32", num_threads=1,
              structured_outputs_backend=request.param)
    return request.param, llm


def _gen(llm, prompts, so: StructuredOutputsParams, **kw):
    sp = SamplingParams(structured_outputs=so, **{"temperature": 0.9, "max_tokens": 64, **kw})
    return [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]


def test_generated_schemas_validate(backend_llm):
    from tests.test_structured_output import _gen_schema

    _, llm = backend_llm
    rng = random.Random(99)
    stopped = 0
    for i in range(8):
        schema = _gen_schema(rng)
        sp = SamplingParams(temperature=0.9, seed=i, max_tokens=96, structured_outputs=StructuredOutputsParams(
            json=schema, disable_any_whitespace=True))
        out = llm.generate(f"Object {i}:", sp, use_tqdm=False)[0].outputs[0]
        if out.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(out.text), schema)
    assert stopped >= 6


def test_regex_choice_grammar_json_object(backend_llm):
    name, llm = backend_llm
    prompts = [f"Item {i}:" for i in range(4)]
    regex = r"[a-c]{2,5}-\d{1,3}"
    for out in _gen(llm, prompts, StructuredOutputsParams(regex=regex), seed=1):
        assert out.finish_reason == "stop" and re.fullmatch(regex, out.text), out.text
    choices = ["yes", "no", "maybe later"]
    for out in _gen(llm, prompts, StructuredOutputsParams(choice=choices), seed=2):
        assert out.text in choices
    for out in _gen(llm, prompts, StructuredOutputsParams(grammar=GRAMMARS[name]), seed=3, max_tokens=40):
        if out.finish_reason == "stop":
            assert re.fullmatch(GRAMMAR_RE, out.text), out.text
        else:
            assert re.fullmatch(r"\((?:[1-9][0-9]?\+?)*", out.text), out.text
    for out in _gen(llm, prompts[:2], StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
                    seed=4, max_tokens=48):
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), (dict, list))  # xgrammar's json_object: any JSON


def test_greedy_is_deterministic_and_n_siblings_each_constrained(backend_llm):
    _, llm = backend_llm
    so = StructuredOutputsParams(regex=r"(ab|cd){1,4}x")
    first = _gen(llm, ["Go:"], so, temperature=0.0)[0].text
    assert _gen(llm, ["Go:"], so, temperature=0.0)[0].text == first
    sp = SamplingParams(temperature=1.0, seed=7, max_tokens=16, n=3, structured_outputs=so)
    for o in llm.generate("Go:", sp, use_tqdm=False)[0].outputs:
        assert re.fullmatch(r"(ab|cd){1,4}x", o.text)


def test_constraint_starts_after_the_reasoning_end(backend_llm):
    """End to end through the engine: the output is free until the reasoning's end marker has been generated
    (here the two tokens greedy decoding writes first, standing in for "</think>"), then constrained."""
    _, llm = backend_llm
    free = llm.generate("Think:", SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0].outputs[0]
    so = StructuredOutputsParams(regex=r"[0-9]{2,4}!", reasoning_end_token_ids=list(free.token_ids))
    out = _gen(llm, ["Think:"], so, temperature=0, max_tokens=16)[0]
    assert list(out.token_ids[:2]) == list(free.token_ids) and out.text.startswith(free.text)
    assert out.finish_reason == "stop" and re.fullmatch(r"[0-9]{2,4}!", out.text[len(free.text):]), out.text


HOSTILE = [
    (dict(json={"type": "strin"}), "structured_outputs.json"),
    (dict(json={"type": "array", "uniqueItems": True}), "uniqueItems"),
    (dict(regex="^(a+)+$"), "catastrophic"),
    (dict(regex="((a{1,1000}){1,1000})"), "structured_outputs.regex"),
    (dict(regex=r"(a)\1"), "backreference"),
    (dict(regex="(?=a)b"), "lookaround"),
    (dict(json={"type": "string", "maxLength": 10**9}), "structured_outputs.json"),
]


@pytest.mark.parametrize(("so", "needle"), HOSTILE)
def test_bad_constraints_name_the_field_fast(backend_llm, so, needle):
    _, llm = backend_llm
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=re.escape(needle)):
        llm.generate("x", SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**so)),
                     use_tqdm=False)
    assert time.monotonic() - t0 < 5
    assert llm.get_stats()["kv_blocks_free"] == llm.get_stats()["kv_blocks_total"]


@pytest.mark.parametrize("grammar", [
    "start: foo",  # an undefined rule
    "start: " + " | ".join(f'"w{i}" start' for i in range(2000)),  # large, and no way to finish
    'start: /(a|aa)*b/ "x" | %ignore',
    "root ::= [",
])
def test_bad_grammars_name_the_field(backend_llm, grammar):
    name, llm = backend_llm
    t0 = time.monotonic()
    try:
        llm.generate("x", SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(grammar=grammar)),
                     use_tqdm=False)
    except ValueError as exc:
        assert "structured_outputs.grammar" in str(exc)
    assert time.monotonic() - t0 < 5
    # the engine keeps serving
    assert _gen(llm, ["y"], StructuredOutputsParams(choice=["ok"]), temperature=0.0)[0].text == "ok"


def test_backends_agree_on_allowed_tokens(test_tokenizer):
    """For a regex both engines read the same way, the allowed next tokens match step after step."""
    vocab = len(test_tokenizer)
    stop = (test_tokenizer.eos_token_id,)
    so = StructuredOutputsParams(regex=r"[0-9]{1,3}(,[a-f]{2})?")
    grammars = []
    for name in BACKENDS:
        m = StructuredOutputManager(test_tokenizer, vocab, stop, backend=name)
        grammars.append(m.request_grammar(m.compile(so), so))
    text_ids = test_tokenizer.encode("12,ab", add_special_tokens=False)
    for step in range(len(text_ids) + 1):
        if grammars[1].terminated:
            # llguidance stops by itself once nothing but the end can follow; xgrammar then allows only that
            assert set(_bits(fill_grammar_bitmask([grammars[0]], vocab).bitmask[0], vocab)) <= set(stop)
            break
        masks = [fill_grammar_bitmask([g], vocab).bitmask[0] for g in grammars]
        allowed = [set(_bits(m, vocab)) - set(stop) for m in masks]
        assert allowed[0] == allowed[1], (step, sorted(allowed[0] ^ allowed[1])[:10])
        if step < len(text_ids):
            assert all(g.accept(text_ids[step]) for g in grammars)
    assert step == len(text_ids)


def _bits(words: torch.Tensor, vocab: int) -> list[int]:
    shifts = torch.arange(32, dtype=torch.int32)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:vocab]
    return bits.nonzero().flatten().tolist()


@pytest.mark.parametrize(("kw", "expected"), [
    ({"structured_outputs_backend": "guidance"}, "guidance"),
    ({"structured_outputs_config": {"backend": "guidance"}}, "guidance"),
    ({"structured_outputs_config": '{"backend": "xgrammar"}'}, "xgrammar"),
    ({"guided_decoding_backend": "guidance"}, "guidance"),
    ({}, "auto"),
    ({"structured_outputs_config": {"disable_fallback": True}}, "xgrammar"),  # auto with no fallback
    ({"structured_outputs_config": {"backend": "guidance", "disable_fallback": True}}, "guidance"),
])
def test_backend_spellings(tiny_llama_dir, kw, expected):
    assert EngineArgs(model=str(tiny_llama_dir), **kw).structured_outputs_backend == expected


@pytest.mark.parametrize(("kw", "field"), [
    ({"structured_outputs_backend": "outlines"}, "structured_outputs_backend"),
    ({"structured_outputs_config": {"backend": "lm-format-enforcer"}}, "structured_outputs_config.backend"),
    ({"structured_outputs_config": {"backend": "guidance", "disable_fallback": "yes"}},
     "structured_outputs_config.disable_fallback"),
    ({"structured_outputs_config": {"reasoning_parser": "qwen3"}}, "structured_outputs_config.reasoning_parser"),
    ({"structured_outputs_config": "{nope"}, "structured_outputs_config"),
    ({"structured_outputs_backend": "xgrammar", "guided_decoding_backend": "guidance"}, "conflicting"),
])
def test_bad_backend_options(tiny_llama_dir, kw, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        EngineArgs(model=str(tiny_llama_dir), **kw)


# -- auto: xgrammar, and llguidance for what xgrammar refuses; the per-request backend -----------------------------
# Constraints xgrammar 0.2.9 refuses and llguidance serves (found by trying both): regex syntax xgrammar's parser
# lacks (named groups, inline flags), draft-7 tuple ``items``, and keywords xgrammar would accept but not enforce.
FALLBACK = [
    # [0-9], not \d: llguidance's \d is Unicode-wide with newer tables than this Python's re (a sampled
    # U+10D43, a Unicode 16 digit, is a digit to it and not to re.fullmatch), so the check would judge the tables.
    StructuredOutputsParams(regex=r"(?P<word>[a-c]{2,4})-(?P<num>[0-9]{1,3})"),
    StructuredOutputsParams(regex=r"(?i)(yes|no)!"),
    StructuredOutputsParams(json={"type": "array", "items": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                             {"enum": ["a", "b"]}], "additionalItems": False},
                            disable_any_whitespace=True),
    StructuredOutputsParams(json={"type": "number", "multipleOf": 0.5, "minimum": 0, "maximum": 5},
                            disable_any_whitespace=True),
    StructuredOutputsParams(json={"type": "object",
                                  "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 9}},
                                  "allOf": [{"required": ["k"]}], "additionalProperties": False},
                            disable_any_whitespace=True),
]


def _valid(so: StructuredOutputsParams, text: str) -> bool:
    if so.regex is not None:
        return re.fullmatch(so.regex, text) is not None
    return jsonschema.Draft7Validator(so.json).is_valid(json.loads(text))


@pytest.fixture(scope="module")
def auto_llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), kv_cache_memory=KV, seed=0, dtype="float32", num_threads=1)


def test_auto_serves_what_xgrammar_refuses(auto_llm, backend_llm, caplog):
    """The same constraints: a ValueError naming the field from an xgrammar engine, valid outputs under auto (and
    the guidance engine). A fallback is logged once per constraint."""
    name, llm = backend_llm
    for i, so in enumerate(FALLBACK):
        if name == "xgrammar":
            with pytest.raises(ValueError, match=re.escape(so.where())):
                _gen(llm, ["x"], so, max_tokens=4)
            continue
        for out in _gen(llm, [f"Item {i}:", f"Other {i}:"], so, seed=i, max_tokens=48):
            assert out.finish_reason == "stop" and _valid(so, out.text), (so, out.text)
    if name == "guidance":
        return
    manager = auto_llm.llm_engine.structured_output
    with caplog.at_level("INFO", logger="llmctl.structured_output.manager"):
        for rep in range(2):
            for i, so in enumerate(FALLBACK):
                for out in _gen(auto_llm, [f"Item {i}:", f"Other {i}:"], so, seed=i + rep, max_tokens=48):
                    assert out.finish_reason == "stop" and _valid(so, out.text), (so, out.text)
    logged = [r for r in caplog.records if "falls back to guidance" in r.getMessage()]
    assert len(logged) == len(FALLBACK)
    assert manager.cache_info()["fallbacks"] == len(FALLBACK)


def test_auto_mixes_engines_in_one_batch(auto_llm):
    """Requests on xgrammar and on llguidance share every step: each row is masked by its own engine's matcher."""
    plain = StructuredOutputsParams(regex=r"[0-9]{2,4}-[a-c]{1,3}")
    sos = [plain, FALLBACK[0], StructuredOutputsParams(choice=["left", "right"]), FALLBACK[3]] * 2
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=48, structured_outputs=so) for i, so in enumerate(sos)]
    outs = auto_llm.generate([f"Row {i}:" for i in range(len(sos))], params, use_tqdm=False)
    for so, out in zip(sos, outs, strict=True):
        o = out.outputs[0]
        assert o.finish_reason == "stop", (so, o.text)
        assert o.text in so.choice if so.choice else _valid(so, o.text), (so, o.text)


def test_auto_routes_each_constraint_to_its_engine(test_tokenizer):
    """Each constraint is cached under the engine that compiled it, and its matchers come from that engine."""
    from llmctl.structured_output.guidance_backend import GuidanceMatcher
    from llmctl.structured_output.xgrammar_backend import XGrammarMatcher

    m = StructuredOutputManager(test_tokenizer, len(test_tokenizer), (test_tokenizer.eos_token_id,))
    plain = StructuredOutputsParams(regex=r"[0-9]{2}")
    named = StructuredOutputsParams(regex=r"(?P<n>[0-9]{2})")
    a, b = m.compile(plain), m.compile(named)
    assert (a.backend, b.backend) == ("xgrammar", "guidance")
    assert isinstance(m.request_grammar(a, plain).matcher, XGrammarMatcher)
    assert isinstance(m.request_grammar(b, named).matcher, GuidanceMatcher)
    assert m.compile(named) is b and m.cache_info() == {"entries": 2, "bytes": m.cache_info()["bytes"],
                                                        "pending": 0, "fallbacks": 1}
    # the request's own choice wins over auto, and is cached apart
    forced = m.compile(StructuredOutputsParams(regex=r"[0-9]{2}", backend="guidance"))
    assert forced.backend == "guidance" and forced is not a
    with pytest.raises(ValueError, match=r"structured_outputs.regex: .*Group modifier"):
        m.compile(StructuredOutputsParams(regex=r"(?P<n>[0-9]{2})", backend="xgrammar"))
    # what clients usually send stays on xgrammar: a Pydantic model's schema (Optional fields as anyOf beside
    # annotations, a discriminated union, enums with their type, bounded strings and numbers)
    from typing import Annotated, Literal

    from pydantic import BaseModel, Field

    class Cat(BaseModel):
        kind: Literal["cat"]
        lives: int = Field(ge=0, le=9)

    class Dog(BaseModel):
        kind: Literal["dog"]
        name: str = Field(max_length=10)

    class Owner(BaseModel):
        pet: Annotated[Cat | Dog, Field(discriminator="kind")]
        nick: str | None = Field(None, min_length=2, max_length=5)
        tags: list[Literal["a", "b"]] = Field(min_length=1, max_length=3)
        ratio: float = Field(gt=0, lt=1)

    assert m.compile(StructuredOutputsParams(json=Owner.model_json_schema())).backend == "xgrammar"
    # refused by both: xgrammar's reason, naming the field; nothing is remembered as a fallback
    with pytest.raises(ValueError, match=r"structured_outputs.regex: .*Word boundary"):
        m.compile(StructuredOutputsParams(regex=r"\bab\b"))
    assert m.cache_info()["fallbacks"] == 1


def test_per_request_backend_offline(backend_llm):
    """``StructuredOutputsParams(backend=...)`` (vLLM's older per-request choice) picks the engine for that request
    whatever the engine's default; an unknown name is a ValueError naming the field and the allowed names."""
    name, llm = backend_llm
    other = "guidance" if name == "xgrammar" else "xgrammar"
    # refused by this engine's default, read by the other one
    so = {"xgrammar": StructuredOutputsParams(regex=r"(?P<w>[ab]{2,4})!"),
          "guidance": StructuredOutputsParams(json={"type": "object", "propertyNames": {"pattern": "^[a-c]{1,3}$"},
                                                    "additionalProperties": {"enum": [1, 2]}, "maxProperties": 2},
                                              disable_any_whitespace=True)}[name]
    with pytest.raises(ValueError, match=re.escape(so.where())):
        _gen(llm, ["x"], so, max_tokens=4)
    chosen = StructuredOutputsParams(**{**vars(so), "backend": other})
    for out in _gen(llm, ["Word:", "Other:"], chosen, seed=5):
        assert out.finish_reason == "stop" and _valid(so, out.text), out.text
    sp = SamplingParams(max_tokens=4, guided_decoding={"regex": "a", "backend": other})  # the dict form, too
    assert sp.structured_outputs.backend == other
    with pytest.raises(ValueError, match=r"structured_outputs.backend: unknown backend 'outlines'; use one of "
                                         r"auto, xgrammar, guidance"):
        StructuredOutputsParams(regex="a", backend="outlines")


# (schema, an instance that violates it): xgrammar compiles each schema but lets the instance through, so the
# xgrammar backend refuses them (and auto hands them to llguidance, which enforces them)
UNENFORCED = [
    ({"type": "number", "multipleOf": 0.5}, "0.3", "multipleOf"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "allOf": [{"required": ["a"]}]}, "{}", "allOf"),
    ({"allOf": [{"type": "integer", "minimum": 5}, {"maximum": 7}]}, "9", "allOf"),
    ({"type": "integer", "anyOf": [{"minimum": 5}, {"maximum": 1}]}, "3", "anyOf"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "oneOf": [{"required": ["a"]}]}, "{}", "oneOf"),
    ({"type": "integer", "enum": [1, "a"]}, '"a"', "enum"),
    ({"type": "string", "pattern": "^[a-z]+$", "minLength": 3}, '"ab"', "minLength"),
    ({"type": "string", "format": "email", "maxLength": 3}, '"abcd@e.com"', "maxLength"),
    ({"type": "string", "pattern": r"\Aab"}, '"Aab"', r"\A"),
]


@pytest.mark.parametrize(("schema", "violation", "needle"), UNENFORCED)
def test_xgrammar_refuses_what_it_would_not_enforce(test_tokenizer, schema, violation, needle):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(test_tokenizer, vocab_size=len(test_tokenizer),
                                              stop_token_ids=[test_tokenizer.eos_token_id])
    raw = xgr.GrammarMatcher(xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(schema)))
    ids = test_tokenizer.encode(violation, add_special_tokens=False) + [test_tokenizer.eos_token_id]
    # the premise, on the installed xgrammar: it accepts the violating instance (if this fails, xgrammar now
    # enforces the keyword and the refusal can go)
    assert all(raw.accept_token(t) for t in ids)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(violation), schema)
    m = StructuredOutputManager(test_tokenizer, len(test_tokenizer), (test_tokenizer.eos_token_id,),
                                backend="xgrammar")
    with pytest.raises(ValueError, match=re.escape(needle)):
        m.compile(StructuredOutputsParams(json=schema))


def test_auto_does_not_fall_back_on_a_timeout(test_tokenizer):
    """Only a refusal hands a constraint to llguidance; an xgrammar compile that runs out of time is a refusal of
    the request within the one deadline, and llguidance is never tried."""
    fresh = StructuredOutputManager(test_tokenizer, len(test_tokenizer), (test_tokenizer.eos_token_id,),
                                    compile_timeout=0.2)
    # building an engine (its tokenizer scan, once) is not part of a constraint's deadline
    t0 = time.monotonic()
    assert fresh.compile(StructuredOutputsParams(regex=r"(?P<a>[0-9])")).backend == "guidance"
    assert time.monotonic() - t0 > 0.2 and fresh.cache_info()["fallbacks"] == 1
    m = StructuredOutputManager(test_tokenizer, len(test_tokenizer), (test_tokenizer.eos_token_id,),
                                compile_timeout=0.2)
    xg, guidance = m.get_backend("xgrammar"), m.get_backend("guidance")
    calls = []

    def slow_refusal(params):
        time.sleep(0.6)
        raise ValueError(f"{params.where()}: refused late")

    xg.compile = slow_refusal
    guidance.compile = lambda params: calls.append(params)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="structured_outputs.regex: compiling .* took longer than 0.2 s"):
        m.compile(StructuredOutputsParams(regex="[0-9]+"))
    assert time.monotonic() - t0 < 0.5
    time.sleep(0.6)  # the late refusal lands: nothing cached, nothing remembered
    assert calls == [] and m.cache_info() == {"entries": 0, "bytes": 0, "pending": 0, "fallbacks": 0}
