"""Token controls (logit_bias, allowed_token_ids, bad_words, logits_processors): each changes the output as
specified, bad values are refused naming the field, and a batch without controls never reaches them."""

from __future__ import annotations

import pytest
import torch
from llmctl import LLM, SamplingParams
from llmctl.engine import sampler as sampler_module
from llmctl.engine.logits_controls import bad_word_bans
from llmctl.engine.request import Request
from llmctl.engine.sampler import Sampler
from llmctl.ops import Ops

from tests._engine_util import _single_thread  # noqa: F401

KV = 32 << 20
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), kv_cache_memory=KV, seed=0, num_threads=1)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=kw.pop("max_tokens", 8), ignore_eos=True, **kw)


def run(llm, params: SamplingParams, prompt: str = PROMPT) -> list[int]:
    return list(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids)


def req(params: SamplingParams, output=()) -> Request:
    r = Request("r", [1, 2], params, arrival_time=0.0, max_tokens=64)
    r.all_token_ids.extend(output)
    return r


# -- sampler level, against logits computed by hand ------------------------------------------------------------------
def test_sampler_controls_on_known_logits():
    sampler = Sampler(Ops.reference(), seed=0)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]] * 4)
    rows = [
        req(SamplingParams(temperature=0.0, logit_bias={4: 5.0})),        # -1 + 5 = 4 beats 3
        req(SamplingParams(temperature=0.0, allowed_token_ids=[2, 3])),   # best allowed is 2
        req(SamplingParams(temperature=0.0, logit_bias={0: -100.0})),     # 0 pushed out: 1 wins
        req(SamplingParams(temperature=0.0)),                             # untouched row in the same batch
    ]
    assert sampler(logits.clone(), rows).token_ids == [4, 2, 1, 0]
    # Sampled rows never leave allowed_token_ids.
    params = SamplingParams(temperature=1.0, allowed_token_ids=[3, 4], seed=7)
    row = req(params)
    drawn = {sampler(logits.clone()[:1], [row]).token_ids[0] for _ in range(50)}
    assert drawn <= {3, 4} and drawn == {3, 4}


def test_bad_word_bans_follow_the_prefix():
    words = [[7], [1, 2, 3]]
    assert bad_word_bans([], words) == [7]
    assert bad_word_bans([5, 1, 2], words) == [7, 3]
    assert bad_word_bans([1, 2, 5], words) == [7]


def test_custom_processor_sees_history_and_both_signatures():
    seen = []

    def force_last(output_ids, logits):
        seen.append(list(output_ids))
        logits[:] = float("-inf")
        logits[4] = 0.0
        return logits

    def with_prompt(prompt_ids, output_ids, logits):
        assert prompt_ids == [1, 2]
        logits[3] += 100.0
        return logits

    sampler = Sampler(Ops.reference(), seed=0)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]] * 2)
    out = sampler(logits, [req(SamplingParams(temperature=0.0, logits_processors=[force_last]), output=[9]),
                           req(SamplingParams(temperature=0.0, logits_processors=[with_prompt]))])
    assert out.token_ids == [4, 3] and seen == [[9]]


def test_no_controls_never_reach_the_control_step(llm, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("controls applied to a batch without any")

    monkeypatch.setattr(sampler_module, "apply_logits_controls", boom)
    run(llm, greedy(max_tokens=3))
    run(llm, SamplingParams(temperature=0.8, seed=1, max_tokens=3, repetition_penalty=1.2))


# -- engine level ----------------------------------------------------------------------------------------------------
def test_logit_bias_forces_and_removes_tokens(llm):
    base = run(llm, greedy())
    target = (base[0] + 11) % llm.llm_engine.model_config.vocab_size
    assert run(llm, greedy(logit_bias={target: 100.0})) == [target] * 8
    banned = run(llm, greedy(logit_bias={t: -100.0 for t in set(base)}))
    assert not set(banned) & set(base)
    # String keys (as OpenAI clients send them) mean the same.
    assert run(llm, greedy(logit_bias={str(target): 100.0})) == [target] * 8


def test_allowed_token_ids_limit_every_step(llm):
    base = run(llm, greedy())
    allowed = [base[0] + 1, base[0] + 2, 5]
    for params in (greedy(allowed_token_ids=allowed), SamplingParams(temperature=1.0, seed=3, max_tokens=8,
                                                                     ignore_eos=True, allowed_token_ids=allowed)):
        out = run(llm, params)
        assert len(out) == 8 and set(out) <= set(allowed)


def test_bad_words_never_completed(llm):
    tok = llm.get_tokenizer()
    base = run(llm, greedy(max_tokens=12))
    text = tok.decode(base)
    words = [w for w in text.split() if w.strip()]
    assert words, text
    out = run(llm, greedy(max_tokens=12, bad_words=words[:3]))
    assert out != base
    for word in words[:3]:
        for form in (word, " " + word):
            ids = tok.encode(form, add_special_tokens=False)
            assert not any(out[i:i + len(ids)] == ids for i in range(len(out))), (word, out)


def test_logits_processor_offline(llm):
    vocab = llm.llm_engine.model_config.vocab_size
    calls = []

    def echo_prev(output_ids, logits):
        calls.append(len(output_ids))
        nxt = (output_ids[-1] + 1) % vocab if output_ids else 42
        logits[:] = float("-inf")
        logits[nxt] = 0.0
        return logits

    out = run(llm, greedy(max_tokens=5, logits_processors=[echo_prev]))
    assert out == [42, 43, 44, 45, 46] and calls == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kw, field", [
    ({"logit_bias": {1: 150.0}}, "logit_bias"),
    ({"logit_bias": {1: -100.5}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"bad_words": [""]}, "bad_words"),
    ({"logits_processors": [3]}, "logits_processors"),
])
def test_bad_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_ids_outside_the_vocabulary(llm):
    vocab = llm.llm_engine.model_config.vocab_size
    for kw, field in (({"logit_bias": {vocab: 1.0}}, "logit_bias"), ({"allowed_token_ids": [0, vocab]},
                                                                      "allowed_token_ids")):
        with pytest.raises(ValueError, match=f"{field}: token id {vocab} is outside the vocabulary"):
            llm.generate([PROMPT], greedy(**kw), use_tqdm=False)
    stats = llm.get_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
