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
