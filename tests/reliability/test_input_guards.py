"""Hostile text in, through the server: a prompt too long for the context is refused before it is tokenized and
never freezes the other clients; lone surrogates are a 400 naming the field; prompt logprobs come back in vLLM's
shape (checked against transformers); the model id is the served name, never a path of the server."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest
import torch
from llmctl.engine.sampler import prompt_logprobs_in_slices, prompt_logprobs_rows
from llmctl_server import ServerSettings
from typer.testing import CliRunner

from tests.reliability.conftest import build_engine, record
from tests.test_server_support import parse_stream, start_server, wait_kv_free

STEP_DELAY_S = 0.01  # the canary's steps are slowed so that it is still streaming while the hostile requests run


@pytest.fixture()
def slowed_server(tiny_llama_dir):
    engine = build_engine(tiny_llama_dir)
    real_step = engine.engine.step

    def step():
        time.sleep(STEP_DELAY_S)  # the engine thread sleeps without the GIL: the event loop is not affected
        return real_step()

    engine.engine.step = step
    srv = start_server(engine, ServerSettings(served_model_names=["tiny"]))
    yield srv
    srv.stop()
    engine.shutdown()


async def _canary(url: str, stamps: list[float]) -> str:
    body = {"model": "tiny", "prompt": "canary", "max_tokens": 480, "ignore_eos": True, "stream": True,
            "temperature": 0}
    async with httpx.AsyncClient(base_url=url, timeout=120) as c, c.stream("POST", "/v1/completions", json=body) as r:
        raw = []
        async for line in r.aiter_lines():
            stamps.append(time.monotonic())
            raw.append(line + "\n")
        return "".join(raw)


def _max_gap(stamps: list[float], t0: float, t1: float) -> tuple[float, int]:
    inside = [t for t in stamps if t0 <= t <= t1]
    if len(inside) < 2:
        return 0.0, len(inside)
    return max(b - a for a, b in zip(inside, inside[1:], strict=False)), len(inside)


def test_huge_prompt_refused_without_freezing_other_streams(slowed_server):
    srv = slowed_server
    limit = srv.app.state.llmctl.max_prompt_chars
    huge = "hello world " * (4_000_000 // 12)  # 4 MB: tokenizing it took seconds on the loop before the cap
    under_cap = "lorem ipsum " * (limit // 12 - 1)  # fits the character cap: tokenized (in a worker thread)

    async def scenario():
        stamps: list[float] = []
        canary = asyncio.create_task(_canary(srv.url, stamps))
        while len(stamps) < 40:  # baseline: the canary's own rhythm
            await asyncio.sleep(0.01)
        b0 = stamps[5]
        b1 = stamps[-1]
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            t0 = time.monotonic()
            rs = await asyncio.gather(
                c.post("/v1/completions", json={"model": "tiny", "prompt": huge, "max_tokens": 4}),
                c.post("/tokenize", json={"model": "tiny", "prompt": huge}),
                c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": huge}]}),
                c.post("/tokenize", json={"model": "tiny", "prompt": under_cap}),
            )
            health = await c.get("/health")
            t1 = time.monotonic()
        raw = await canary
        return rs, health, stamps, (b0, b1), (t0, t1), raw

    rs, health, stamps, (b0, b1), (t0, t1), raw = asyncio.run(scenario())
    for r, param in zip(rs[:3], ("prompt", "prompt", "messages"), strict=True):
        assert r.status_code == 400, r.text[:300]
        err = r.json()["error"]
        assert err["param"] == param and err["code"] == "context_length_exceeded", err
        assert str(limit) in err["message"]
    assert rs[3].status_code == 200 and rs[3].json()["count"] > srv.app.state.llmctl.max_model_len
    assert health.status_code == 200
    assert parse_stream(raw)[-1]["choices"][0]["finish_reason"] == "length"
    baseline_gap, _ = _max_gap(stamps, b0, b1)
    hostile_gap, chunks = _max_gap(stamps, t0, t1)
    record("huge_prompt", prompt_chars=len(huge), char_limit=limit, hostile_seconds=round(t1 - t0, 2),
           canary_chunks_during=chunks, canary_max_gap_s=round(hostile_gap, 3),
           canary_baseline_max_gap_s=round(baseline_gap, 3))
    assert chunks >= 2, "the canary was not streaming while the hostile requests ran"
    # Before the cap, the canary stalled for as long as the 4 MB prompt took to tokenize on the loop (seconds);
    # what is left is JSON parsing of the body. Relative to the canary's own rhythm, and generous for a shared box.
    assert hostile_gap < max(5 * baseline_gap, 1.0), (hostile_gap, baseline_gap)
    wait_kv_free(srv.engine)


SURROGATE_CASES = [
    ("/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "x\\udfff"], "max_tokens": 2}', "prompt[1]"),
    ("/v1/chat/completions", '{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"model": "tiny", "max_tokens": 2, "messages": [{"role": "system", "content": "hi"}, '
     '{"role": "user", "content": [{"type": "text", "text": "a\\ud83d"}]}]}', "messages[1].content"),
    ("/v1/chat/completions", '{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi", '
     '"name": "\\udc00"}]}', "messages[0].name"),
    ("/tokenize", '{"model": "tiny", "prompt": "\\ud800"}', "prompt"),
    ("/tokenize", '{"model": "tiny", "messages": [{"role": "user", "content": "z\\ud800"}]}', "messages[0].content"),
]


def test_lone_surrogates_are_400_naming_the_field(slowed_server, caplog):
    srv = slowed_server
    caplog.set_level(logging.WARNING, logger="llmctl_server")
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for path, body, param in SURROGATE_CASES:
            r = c.post(path, content=body.encode(), headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and "surrogate" in err["message"], (body, err)
        # a valid surrogate pair is one character, not an error
        ok = c.post("/tokenize", content=b'{"model": "tiny", "prompt": "\\ud83d\\ude00"}',
                    headers={"content-type": "application/json"})
        assert ok.status_code == 200, ok.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_prompt_logprobs_in_slices_equal_all_at_once():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (37,))
    whole = prompt_logprobs_rows(hidden @ weight.T, targets, 3)
    sliced = prompt_logprobs_in_slices(hidden, lambda h: h @ weight.T, targets, 3, slice_rows=8)
    assert len(sliced) == len(whole)
    for a, b in zip(sliced, whole, strict=True):  # the GEMM of a slice may round differently from the whole
        assert a.top_ids == b.top_ids and a.sampled_rank == b.sampled_rank
        assert a.sampled_logprob == pytest.approx(b.sampled_logprob, abs=1e-5)
        assert a.top_logprobs == pytest.approx(b.top_logprobs, abs=1e-5)


def test_prompt_logprobs_returned_in_vllm_shape(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    engine = build_engine(tiny_llama_dir, dtype="float32")
    srv = start_server(engine, ServerSettings(served_model_names=["tiny"]))
    try:
        tok = engine.tokenizer
        text = " ".join(["river stone cloud seven north quiet lamp orbit"] * 40)  # > 256 tokens: two slices
        ids = tok(text)["input_ids"]
        assert len(ids) > 256
        k = 3
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            comp = c.post("/v1/completions", json={"model": "tiny", "prompt": text, "max_tokens": 2,
                                                   "prompt_logprobs": k, "n": 2, "temperature": 0})
            chat = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "prompt_logprobs": 0,
                                                        "messages": [{"role": "user", "content": "hi there"}]})
            streamed = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "stream": True,
                                                       "prompt_logprobs": 1})
            plain = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert comp.status_code == 200, comp.text[:300]
        assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"
        assert plain.json()["choices"][0]["prompt_logprobs"] is None
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        for choice in comp.json()["choices"]:
            plp = choice["prompt_logprobs"]
            assert len(plp) == len(ids) and plp[0] is None
            worst = 0.0
            for pos in range(1, len(ids)):
                entry = plp[pos]
                actual = entry[str(ids[pos])]
                worst = max(worst, abs(actual["logprob"] - ref[pos - 1, ids[pos]].item()))
                ranked = sorted((v["rank"], int(t)) for t, v in entry.items())
                top = ref[pos - 1].topk(k).indices.tolist()
                assert [t for r, t in ranked if r <= k] == top[: len([r for r, _ in ranked if r <= k])]
                v = ref[pos - 1, ids[pos]]  # the rank, up to tokens within rounding of the actual one's logprob
                lo, hi = int((ref[pos - 1] > v + 1e-3).sum()) + 1, int((ref[pos - 1] > v - 1e-3).sum()) + 1
                assert lo <= actual["rank"] <= hi, (actual, lo, hi)
                assert isinstance(actual["decoded_token"], str)
            assert worst < 2e-3, worst
        body = chat.json()
        assert chat.status_code == 200, chat.text[:300]
        plp = body["prompt_logprobs"]
        assert plp[0] is None and len(plp) == body["usage"]["prompt_tokens"]
        assert all(len(e) == 1 for e in plp[1:])  # prompt_logprobs=0: the actual token only
        wait_kv_free(engine)
    finally:
        srv.stop()
        engine.shutdown()


def test_served_name_not_path(tiny_llama_dir, monkeypatch):
    """`llmctl serve` with no MODEL serves the default under its name; a typed MODEL keeps what was typed."""
    import llmctl_cli.main as cli
    import llmctl_server.launcher as launcher

    seen: dict = {}

    class FakeEngine:
        def shutdown(self):
            pass

    monkeypatch.setattr(cli, "load_engine", lambda args: seen.setdefault("args", args) and FakeEngine())
    monkeypatch.setattr(launcher, "run_server", lambda engine, settings, **kw: seen.setdefault("settings", settings)
                        and 0)
    r = CliRunner().invoke(cli.app, ["serve"])
    assert r.exit_code == 0, r.output
    assert seen["settings"].served_model_names == ["SmolLM2-135M-Instruct"]
    assert "/" not in seen["settings"].model_root
    seen.clear()
    r = CliRunner().invoke(cli.app, ["serve", "some-dir/my-model"])
    assert r.exit_code == 0, r.output
    assert seen["settings"].served_model_names == [] and seen["args"].model == "some-dir/my-model"

    # and the server answers with that name: /v1/models, responses, and the 404 for another name
    engine = build_engine(tiny_llama_dir)
    srv = start_server(engine, ServerSettings(served_model_names=["SmolLM2-135M-Instruct"],
                                              model_root="SmolLM2-135M-Instruct.Q4_1.gguf"))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            models = c.get("/v1/models").json()["data"]
            out = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).json()
            missing = c.post("/v1/completions", json={"model": "other", "prompt": "x", "max_tokens": 2})
        texts = json.dumps(models) + json.dumps(out) + missing.text
        assert models[0]["id"] == "SmolLM2-135M-Instruct" and out["model"] == "SmolLM2-135M-Instruct"
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        assert str(tiny_llama_dir) not in texts and "site-packages" not in texts
    finally:
        srv.stop()
        engine.shutdown()
