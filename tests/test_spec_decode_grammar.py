"""Speculative decoding under structured output: drafts the grammar rejects are cut before verification, every
draft position is sampled under the grammar's state after the drafts before it, and the output is the one the
same grammar gives without speculation, for every grammar backend."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from llmctl import SamplingParams
from llmctl.structured_output import StructuredOutputsParams

from tests._engine_util import assert_all_blocks_free
from tests.test_spec_decode import OracleProposer, full_ids, make_llm
from tests.test_structured_output_backends import BACKENDS

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]},
                                                    "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
REGEX = r"(ab|cd){2,6}-[0-9]{3}"
CONSTRAINTS = {
    "json": dict(json=SCHEMA, disable_any_whitespace=True),
    "regex": dict(regex=REGEX),
    "choice": dict(choice=["alpha beta gamma", "alpha beta delta", "omega"]),
}
PROMPTS = ["one two three one two three", "Hello, my name is", "alpha beta gamma alpha beta"]


def _params(kind: str, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=48, structured_outputs=StructuredOutputsParams(**CONSTRAINTS[kind]), **kw)


def _check(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    else:
        assert text in CONSTRAINTS["choice"]["choice"]


class _CountingProposer(OracleProposer):
    """The oracle's drafts (the plain output, every third draft wrong), plus tokens the grammar cannot take, so
    that both the grammar's cut and the target's rejection are exercised."""

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        draft = super().propose(token_ids, k)
        if draft and self.calls % 2:
            draft[-1] = self.vocab - 1  # a token no constraint here allows
        return draft


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def plain_llm(tiny_llama_dir, backend):
    return make_llm(tiny_llama_dir, structured_outputs_backend=backend)


@pytest.fixture(scope="module")
def spec_llm(tiny_llama_dir, backend):
    return make_llm(tiny_llama_dir, {"method": "ngram", "num_speculative_tokens": 4}, blocks=64,
                    structured_outputs_backend=backend)


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_grammar_drafts_greedy_identical(plain_llm, spec_llm, kind):
    params = _params(kind, temperature=0.0)
    ref = plain_llm.generate(PROMPTS, params, use_tqdm=False)
    core = spec_llm.llm_engine.core
    oracle = _CountingProposer([full_ids(o) for o in ref], spec_llm.llm_engine.model_config.vocab_size)
    core.speculator.proposer = oracle
    verify, verified = core.rejection_sampler, []

    def spy(logits, requests, drafts):
        verified.extend(t for d in drafts for t in d)
        return verify(logits, requests, drafts)

    core.rejection_sampler = spy
    before = spec_llm.get_stats()
    try:
        got = spec_llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        core.rejection_sampler = verify
    for r, g in zip(ref, got):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        assert g.outputs[0].finish_reason == r.outputs[0].finish_reason
        if r.outputs[0].finish_reason == "stop":
            _check(kind, g.outputs[0].text)
    stats = spec_llm.get_stats()
    drafted = stats["spec_num_draft_tokens"] - before["spec_num_draft_tokens"]
    accepted = stats["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
    assert drafted > 0 and accepted > 0, stats
    # the poisoned drafts never reach verification: the grammar cut them
    assert verified and oracle.vocab - 1 not in verified
    assert_all_blocks_free(stats)


def test_grammar_cuts_drafts_before_verification(spec_llm):
    """A draft is cut to the prefix the grammar allows, before a token that would end the grammar, and the
    matcher is left as it was."""
    engine = spec_llm.llm_engine
    manager = engine.structured_output
    so = StructuredOutputsParams(**CONSTRAINTS["regex"])
    grammar = manager.request_grammar(manager.compile(so), so)
    tok = spec_llm.get_tokenizer()
    good = tok.encode("abcd", add_special_tokens=False)
    bad = tok.encode("zz", add_special_tokens=False)
    assert grammar.draft_prefix(good + bad + good) == good
    assert grammar.draft_prefix(bad) == []
    assert grammar.draft_prefix(good) == good  # the state did not move: the same answer twice
    whole = tok.encode("abcd-123", add_special_tokens=False)
    eos = engine.model_config.eos_token_ids[0]
    ended = grammar.draft_prefix(whole + [eos] + good)  # nothing after the token that ends the grammar
    assert ended in (whole, whole + [eos])  # llguidance ends on the last character, xgrammar on the end token
    for t in whole:
        assert grammar.accept(t)


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_sampled_outputs_under_speculation_follow_the_grammar(spec_llm, kind):
    """At temperature > 0 each draft position is masked with the grammar state after the drafts before it, so
    every finished output is valid."""
    outs = spec_llm.generate(PROMPTS * 2, _params(kind, temperature=0.9, seed=3), use_tqdm=False)
    finished = [o.outputs[0].text for o in outs if o.outputs[0].finish_reason == "stop"]
    assert finished
    for text in finished:
        _check(kind, text)
    assert_all_blocks_free(spec_llm.get_stats())
