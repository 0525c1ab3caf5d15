"""The decoding surfaces on the server (one engine with n-gram speculation): logit_bias / allowed_token_ids /
bad_words, use_beam_search, the speculation gauges on /metrics, and 400s naming the field. Expected outputs
come from the offline ``LLM`` on the same checkpoint."""

from __future__ import annotations

import httpx
import pytest
from llmctl import LLM, AsyncLLM, BeamSearchParams, EngineArgs, SamplingParams
from llmctl_server import ServerSettings

from tests.test_server_support import start_server, wait_kv_free

KV = 32 << 20
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
PROMPT = "one two three one two three one two"


@pytest.fixture(scope="module")
def offline(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), kv_cache_memory=KV, seed=0, num_threads=1)


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    engine = AsyncLLM.from_engine_args(EngineArgs.from_kwargs(str(tiny_llama_dir), kv_cache_memory=KV, seed=0,
                                                              num_threads=1, speculative_config=SPEC))
    srv = start_server(engine, ServerSettings(served_model_names=["tiny"]))
    yield srv
    srv.stop()
    engine.shutdown()


def post(live, path: str, **body) -> httpx.Response:
    return httpx.post(live.url + path, json={"model": "tiny", **body}, timeout=120)


def test_logits_controls_over_http(live, offline):
    vocab = offline.llm_engine.model_config.vocab_size
    base = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids
    target = (base[0] + 5) % vocab
    r = post(live, "/v1/completions", prompt=PROMPT, max_tokens=6, temperature=0, ignore_eos=True,
             logit_bias={str(target): 100})
    assert r.status_code == 200, r.text
    expected = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                       logit_bias={target: 100}), use_tqdm=False)[0].outputs[0]
    assert expected.token_ids == [target] * 6 and r.json()["choices"][0]["text"] == expected.text
    allowed = [base[0] + 1, 7]
    r = post(live, "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
             temperature=0, allowed_token_ids=allowed, bad_words=["hello"])
    assert r.status_code == 200, r.text
    for body, field in (({"logit_bias": {"5": 150}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                        ({"logit_bias": {str(vocab): 1}}, "logit_bias"),
                        ({"allowed_token_ids": [vocab + 3]}, "allowed_token_ids"),
                        ({"allowed_token_ids": []}, "allowed_token_ids"),
                        ({"bad_words": [""]}, "bad_words")):
        r = post(live, "/v1/completions", prompt=PROMPT, max_tokens=3, **body)
        assert r.status_code == 400, (body, r.text)
        assert field in r.json()["error"]["message"], r.text
    wait_kv_free(live.engine)


def test_beam_search_over_http(live, offline):
    ref = offline.beam_search([PROMPT], BeamSearchParams(beam_width=3, max_tokens=6))[0].sequences
    tok = offline.get_tokenizer()
    r = post(live, "/v1/completions", prompt=PROMPT, max_tokens=6, n=3, use_beam_search=True)
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == [tok.decode(s.output_token_ids, skip_special_tokens=True)
                                                        for s in ref]
    msgs = [{"role": "user", "content": "Say hi"}]
    r = post(live, "/v1/chat/completions", messages=msgs, max_tokens=4, n=2, use_beam_search=True)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
    for body, field in (({"stream": True}, "stream"), ({"n": 11}, "n"), ({"temperature": 0.5}, "temperature"),
                        ({"logprobs": 2}, "logprobs"), ({"length_penalty": "x"}, "length_penalty")):
        r = post(live, "/v1/completions", prompt=PROMPT, max_tokens=3, use_beam_search=True, **body)
        assert r.status_code == 400, (body, r.text)
        assert field in r.text, r.text
    wait_kv_free(live.engine)


def test_speculation_on_the_server(live, offline):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = offline.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].text
    r = post(live, "/v1/completions", prompt=PROMPT, max_tokens=16, temperature=0, ignore_eos=True)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected, r.text
    metrics = httpx.get(live.url + "/metrics").text
    assert "llmctl_spec_decode_acceptance_rate" in metrics and "llmctl_spec_decode_tokens_per_step" in metrics
    wait_kv_free(live.engine)


def test_cli_speculative_config_errors():
    from llmctl_cli.main import UserError, engine_args

    for value, field in (('{"method": "ngram", "num_speculative_tokens": 99}', "num_speculative_tokens"),
                         ('{"method": "nope", "num_speculative_tokens": 2}', "method"),
                         ("{oops", "speculative_config")):
        with pytest.raises(UserError, match=field):
            engine_args("some-model", speculative_config=value)
