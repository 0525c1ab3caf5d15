"""Hostile input to an encoder-decoder (BART) server: every case is a 400 naming the field and the limit, and no
KV block stays taken afterwards."""

from __future__ import annotations

import httpx
import pytest
from llmctl_server import ServerSettings

from tests.reliability.conftest import build_engine
from tests.test_encoder_decoder import make_tiny_bart
from tests.test_server_support import start_server, wait_kv_free


@pytest.fixture(scope="module")
def bart_server(tmp_path_factory, test_tokenizer):
    path = make_tiny_bart(tmp_path_factory.mktemp("hostile-bart") / "bart", test_tokenizer)
    engine = build_engine(path, dtype="float32", block_size=16)
    srv = start_server(engine, ServerSettings(served_model_names=["bart"]))
    yield srv
    srv.stop()
    engine.shutdown()


@pytest.mark.parametrize("body,param,words", [
    # the tiny BART's encoder positions stop at 128
    ({"prompt": [5] * 129, "max_tokens": 2}, "prompt", ["129 tokens", "max_position_embeddings (128)"]),
    ({"prompt": [5] * 4000, "max_tokens": 2}, "prompt", []),
    ({"prompt": "hello", "max_tokens": 129}, "max_tokens", ["129", "decoder's max_position_embeddings (128)"]),
    ({"prompt": "hello", "max_tokens": 2, "echo": True, "logprobs": 1}, "prompt_logprobs", ["encoder-decoder"]),
    ({"prompt": "hello", "max_tokens": 2, "prompt_logprobs": 1}, "prompt_logprobs", ["encoder-decoder"]),
    ({"prompt": "hello", "max_tokens": 2, "n": 2, "use_beam_search": True}, "use_beam_search",
     ["encoder-decoder"]),
    ({"prompt": [], "max_tokens": 2}, "prompt", []),
])
def test_bad_encoder_decoder_input_is_a_named_400(bart_server, body, param, words):
    with httpx.Client(base_url=bart_server.url, timeout=60) as http:
        r = http.post("/v1/completions", json={"model": "bart", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err
    wait_kv_free(bart_server.engine)


def test_unset_max_tokens_stops_at_the_decoder_positions(bart_server):
    """``max_tokens: null`` means what is left, which for an encoder-decoder is the decoder's positions."""
    with httpx.Client(base_url=bart_server.url, timeout=120) as http:
        r = http.post("/v1/completions", json={"model": "bart", "prompt": "hi", "max_tokens": None,
                                               "temperature": 0, "min_tokens": 128})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 128
    wait_kv_free(bart_server.engine)


def test_many_encoder_lengths_at_once_leave_no_block(bart_server):
    """Encoders from 1 to 128 tokens, sent together: all answered, and every block comes back."""
    import concurrent.futures

    def one(n: int) -> int:
        with httpx.Client(base_url=bart_server.url, timeout=120) as http:
            r = http.post("/v1/completions", json={"model": "bart", "prompt": [7] * n, "max_tokens": 4,
                                                   "temperature": 0})
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, [1, 15, 16, 17, 31, 32, 33, 64, 100, 127, 128, 128]))
    assert codes == [200] * len(codes)
    wait_kv_free(bart_server.engine)
