"""Stop conditions: stop strings across token boundaries, stop_token_ids, EOS, ignore_eos, min_tokens, max_tokens."""

from __future__ import annotations

import pytest
from llmctl import LLM, SamplingParams

from tests._engine_util import _single_thread, assert_all_blocks_free  # noqa: F401

PROMPT = "The quick brown fox jumps over the lazy dog and then"
N = 24


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def base(llm):
    """The unconstrained greedy continuation (with top-2 logprobs) every test below derives its expectation from."""
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, logprobs=2),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == N
    return out


@pytest.fixture
def eos_ids(llm):
    """Lets a test choose the engine's EOS ids; restores them afterwards."""
    ip = llm.llm_engine.input_processor
    saved = ip.eos_token_ids
    yield lambda ids: setattr(ip, "eos_token_ids", tuple(ids))
    ip.eos_token_ids = saved


def first_index_unique(ids: list[int]) -> int:
    """An index >= 3 whose token does not occur earlier, so stopping at its first occurrence is well defined."""
    for i in range(3, len(ids) - 3):
        if ids[i] not in ids[:i]:
            return i
    pytest.fail("no suitable token in the greedy continuation")


def spanning_stop(llm, ids: list[int]) -> tuple[str, int, int]:
    """A 4-character stop string made of the last 2 characters of token k and the first 2 of token k+1, whose
    first occurrence in the text is exactly there. Returns (stop, char position, k)."""
    tok = llm.get_tokenizer()
    text = tok.decode(ids, skip_special_tokens=True)
    for k in range(2, len(ids) - 2):
        end = len(tok.decode(ids[:k + 1], skip_special_tokens=True))
        nxt = len(tok.decode(ids[:k + 2], skip_special_tokens=True))
        if end - len(tok.decode(ids[:k], skip_special_tokens=True)) < 2 or nxt - end < 2:
            continue
        stop = text[end - 2:end + 2]
        if text.find(stop) == end - 2 and stop.strip() == stop:
            return stop, end - 2, k
    pytest.fail("no stop string spanning two tokens found")


def test_stop_string_across_token_boundary(llm, base):
    tok = llm.get_tokenizer()
    text = tok.decode(base.token_ids, skip_special_tokens=True)
    assert base.text == text
    stop, pos, k = spanning_stop(llm, base.token_ids)
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, stop=[stop, "@@never@@"]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:pos]
    assert out.token_ids == base.token_ids[:k + 2]  # generation ends with the token that completes the stop string
    inc = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, stop=stop,
                                              include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert inc.text == text[:pos + len(stop)] and inc.stop_reason == stop and inc.finish_reason == "stop"
    assert_all_blocks_free(llm.get_stats())


def test_stop_string_streamed_text_never_shows_the_stop(llm, base):
    stop, pos, _k = spanning_stop(llm, base.token_ids)
    engine = llm.llm_engine
    engine.add_request("stream-stop", PROMPT, SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True,
                                                               stop=[stop]))
    texts = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
    assert texts[-1] == base.text[:pos]
    for a, b in zip(texts, texts[1:]):
        assert b.startswith(a)  # streamed text only grows
    assert all(stop not in t for t in texts)
    assert_all_blocks_free(llm.get_stats())


def test_stop_token_ids(llm, base):
    i = first_index_unique(base.token_ids)
    stop_id = base.token_ids[i]
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=N, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[:i + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    tok = llm.get_tokenizer()
    assert out.text == tok.decode(base.token_ids[:i + 1], skip_special_tokens=True)


def test_eos_stops_and_ignore_eos_continues(llm, base, eos_ids):
    i = first_index_unique(base.token_ids)
    eos_ids([base.token_ids[i]])
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=N), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[:i + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None
    cont = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert cont.token_ids == base.token_ids and cont.finish_reason == "length"


@pytest.mark.parametrize("how", ["eos", "stop_token_ids"])
def test_min_tokens_suppresses_eos_and_stop_ids(llm, base, eos_ids, how):
    i = first_index_unique(base.token_ids)
    banned = base.token_ids[i]
    if how == "eos":
        eos_ids([banned])
        params = SamplingParams(temperature=0.0, max_tokens=N, min_tokens=i + 2)
    else:
        params = SamplingParams(temperature=0.0, max_tokens=N, min_tokens=i + 2, stop_token_ids=[banned])
    out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= i + 2
    assert out.token_ids[:i] == base.token_ids[:i]
    # At position i the banned token was the argmax, so the runner-up is chosen instead.
    runner_up = [t for t in base.logprobs[i] if t != banned and base.logprobs[i][t].rank == 2]
    assert runner_up and out.token_ids[i] == runner_up[0]
    assert banned not in out.token_ids[:i + 2]
    if banned in out.token_ids:
        assert out.token_ids.index(banned) == len(out.token_ids) - 1 and out.finish_reason == "stop"
    else:
        assert out.finish_reason == "length"


def test_max_tokens_gives_length(llm, base):
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[:5] and out.finish_reason == "length" and out.stop_reason is None
    assert_all_blocks_free(llm.get_stats())
