"""The server on the real SmolLM2-135M-Instruct GGUF: real text, and streams that split multi-byte characters."""

from __future__ import annotations

import httpx
import openai
import pytest
from llmctl import LLM, AsyncLLM, EngineArgs, SamplingParams
from llmctl_server import ServerSettings
from llmctl_server.tokens import TokenText

from tests.test_server_support import parse_stream, start_server

KV = 64 << 20
MESSAGES = [{"role": "user", "content": "Repeat exactly, nothing else: 你好，世界！ 😀 Grüße, ça va? 日本語"}]


@pytest.fixture(scope="module")
def gguf_server(smollm2_gguf):
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(smollm2_gguf), kv_cache_memory=KV, max_model_len=1024,
                                                    dtype="float32"))
    srv = start_server(engine, ServerSettings())
    yield srv
    srv.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def gguf_offline(smollm2_gguf):
    return LLM(model=str(smollm2_gguf), kv_cache_memory=KV, max_model_len=1024, dtype="float32")


def test_gguf_chat_matches_offline_and_streams_valid_utf8(gguf_server, gguf_offline):
    expected = gguf_offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    out = expected.outputs[0]
    # Precondition, so the test means something: some generated token is not a whole UTF-8 character alone.
    tt = TokenText(gguf_offline.get_tokenizer())
    partial = []
    for tid in out.token_ids:
        try:
            bytes(tt.bytes(tid)).decode("utf-8")
        except UnicodeDecodeError:
            partial.append(tid)
    assert partial, f"no split character in {out.text!r}; pick another prompt"
    assert "\ufffd" not in out.text

    model = httpx.get(gguf_server.base + "/models").json()["data"][0]["id"]
    client = openai.OpenAI(base_url=gguf_server.base, api_key="x", max_retries=0, timeout=120)
    full = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=40, temperature=0)
    assert full.choices[0].message.content == out.text

    body = {"messages": MESSAGES, "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", gguf_server.base + "/chat/completions", json=body, timeout=120) as r:
        raw = r.read()
    events = parse_stream(raw.decode("utf-8"))  # raises if any byte sequence is invalid
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == out.text


def test_gguf_completion_stream_equals_offline(gguf_server, gguf_offline):
    prompt = "The three primary colours are"
    expected = gguf_offline.generate(prompt, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    model = httpx.get(gguf_server.base + "/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}
    with httpx.stream("POST", gguf_server.base + "/completions", json=body, timeout=120) as r:
        events = parse_stream(r.read().decode("utf-8"))
    assert "".join(e["choices"][0]["text"] for e in events) == expected.outputs[0].text
