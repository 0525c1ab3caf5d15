"""Multi-LoRA over HTTP with the openai client: adapters by model name, /v1/models with parents, a mixed
concurrent batch against peft-merged transformers, and dynamic loading (only with --allow-runtime-lora)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from llmctl import AsyncLLM, EngineArgs
from llmctl_server import ServerSettings

from tests.lora_support import make_adapter, merged_generate
from tests.test_server_support import start_server

pytest.importorskip("peft")
KEY = "lora-test-key"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42, 43, 44]]


@pytest.fixture(scope="module")
def lora_dirs(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-root")
    base = tiny_model_dirs["llama"]
    return {"root": root,
            "attn": make_adapter(base, root / "attn", 8, 16, ["q_proj", "v_proj", "o_proj"], False, seed=11),
            "mlp": make_adapter(base, root / "mlp", 4, 8, ["gate_proj", "up_proj", "down_proj"], False, seed=12)}


@pytest.fixture(scope="module")
def lora_server(tiny_model_dirs, lora_dirs):
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(tiny_model_dirs["llama"]), dtype="float32",
                                                  kv_cache_memory=32 << 20, enable_lora=True, max_loras=2))
    settings = ServerSettings(served_model_names=["tiny"], api_key=KEY, lora_modules=[f"attn={lora_dirs['attn']}"],
                              allow_runtime_lora=True, lora_root=str(lora_dirs["root"]))
    srv = start_server(engine, settings)
    yield srv
    srv.stop()
    engine.shutdown()


def _client(srv) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.base, api_key=KEY, max_retries=0, timeout=120)


async def _complete(client, model: str, prompt: list[int]) -> list[int]:
    r = await client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
    return r.choices[0].text


def test_adapters_by_model_name_in_one_concurrent_batch_equal_merged_transformers(tiny_model_dirs, lora_dirs,
                                                                                   lora_server):
    base = tiny_model_dirs["llama"]
    tok = lora_server.engine.tokenizer

    async def run():
        client = _client(lora_server)
        r = await client.post("/load_lora_adapter", body={"lora_name": "mlp", "lora_path": "mlp"},
                              cast_to=httpx.Response)
        assert r.status_code == 200, r.text
        models = {m.id: m for m in (await client.models.list()).data}
        assert set(models) == {"tiny", "attn", "mlp"}
        assert models["attn"].model_extra["parent"] == "tiny" and models["mlp"].model_extra["parent"] == "tiny"
        jobs = [(name, i) for name in ("tiny", "attn", "mlp") for i in range(len(PROMPTS))]
        texts = await asyncio.gather(*(_complete(client, name, PROMPTS[i]) for name, i in jobs))
        return dict(zip(jobs, texts))

    got = asyncio.run(run())
    for name, adapter in (("tiny", None), ("attn", lora_dirs["attn"]), ("mlp", lora_dirs["mlp"])):
        for i, want in enumerate(merged_generate(base, adapter, PROMPTS)):
            assert got[(name, i)] == tok.decode(want), (name, i)


def test_unload_then_unknown_adapter_is_a_404_like_an_unknown_model(lora_server, lora_dirs):
    async def run():
        client = _client(lora_server)
        r = await client.post("/load_lora_adapter", body={"lora_name": "gone", "lora_path": "attn"},
                              cast_to=httpx.Response)
        assert r.status_code == 200, r.text
        assert await _complete(client, "gone", PROMPTS[1])
        r = await client.post("/unload_lora_adapter", body={"lora_name": "gone"}, cast_to=httpx.Response)
        assert r.status_code == 200, r.text
        with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
            await _complete(client, "gone", PROMPTS[1])
        with pytest.raises(openai.NotFoundError):
            await client.post("/unload_lora_adapter", body={"lora_name": "gone"}, cast_to=httpx.Response)

    asyncio.run(run())


def test_runtime_lora_routes_exist_only_when_allowed(tiny_model_dirs, lora_server, lora_dirs):
    srv = start_server(lora_server.engine, ServerSettings(served_model_names=["tiny"]))
    try:
        r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "attn"}, timeout=30)
        assert r.status_code == 404
    finally:
        srv.stop()


def test_lora_modules_json_form_names_its_base_model_and_a_bad_entry_stops_the_start_up(tiny_model_dirs, lora_dirs):
    """``--lora-modules`` in vLLM's JSON form (with ``base_model_name``) is served with its parent; an entry whose
    base model is another, whose adapter is unreadable or too large stops the start-up with the reason, before the
    server takes a request."""
    import json

    from llmctl_server.app import build_app

    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(tiny_model_dirs["llama"]), dtype="float32",
                                                  kv_cache_memory=16 << 20, enable_lora=True, max_lora_rank=4))
    try:
        good = json.dumps({"name": "j", "path": str(lora_dirs["mlp"]), "base_model_name": "tiny"})
        srv = start_server(engine, ServerSettings(served_model_names=["tiny"], lora_modules=[good]))
        try:
            models = {m["id"]: m for m in httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]}
            assert set(models) == {"tiny", "j"} and models["j"]["parent"] == "tiny"
            r = httpx.post(srv.url + "/v1/completions", json={"model": "j", "prompt": PROMPTS[1], "max_tokens": 8,
                                                              "temperature": 0, "ignore_eos": True}, timeout=60)
            assert r.status_code == 200, r.text
            want = merged_generate(tiny_model_dirs["llama"], lora_dirs["mlp"], [PROMPTS[1]])[0]
            assert r.json()["choices"][0]["text"] == engine.tokenizer.decode(want)
        finally:
            srv.stop()
        for entry, why in (
            (json.dumps({"name": "j", "path": str(lora_dirs["mlp"]), "base_model_name": "other"}),
             "adapter 'j' names base model 'other', but this server serves 'tiny'"),
            (json.dumps({"name": "j", "path": str(lora_dirs["root"] / "missing")}),
             "lora adapter 'j'.*lora_path: no such adapter directory"),
            (f"big={lora_dirs['attn']}", "lora adapter 'big'.*r: rank 8 is above max_lora_rank 4"),
            ('{"name": "j"}', 'JSON form needs {"name": ..., "path": ...}'),
            ("no-equals-sign", "expected name=path or JSON"),
        ):
            with pytest.raises(ValueError, match=why):
                build_app(engine, ServerSettings(served_model_names=["tiny"], lora_modules=[entry]))
        engine.check_health()
    finally:
        engine.shutdown()
