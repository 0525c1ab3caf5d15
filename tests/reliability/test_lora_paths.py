"""Hostile input to the run-time LoRA routes: a client chooses the adapter path, so it must never reach outside
--lora-root (``..``, absolute paths, symlinks that lead out), the routes need the API key, and a bad adapter fails
only its own load, with the reason, while the server keeps serving."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from llmctl import AsyncLLM, EngineArgs
from llmctl_server import ServerSettings

from tests.lora_support import make_adapter
from tests.test_server_support import start_server

pytest.importorskip("peft")
KEY = "k-lora"


@pytest.fixture(scope="module")
def srv(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    outside = tmp_path_factory.mktemp("outside")
    base = tiny_model_dirs["llama"]
    make_adapter(base, root / "good", 4, 8, ["q_proj"], False, seed=3)
    make_adapter(base, outside / "secret", 4, 8, ["q_proj"], False, seed=4)
    os.symlink(outside / "secret", root / "link-out")
    make_adapter(base, root / "big", 32, 32, ["q_proj"], False, seed=5)
    (root / "badjson").mkdir()
    (root / "badjson" / "adapter_config.json").write_text("{not json")
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(base), dtype="float32", kv_cache_memory=16 << 20,
                                                  enable_lora=True, max_lora_rank=16))
    server = start_server(engine, ServerSettings(served_model_names=["tiny"], api_key=KEY, allow_runtime_lora=True,
                                                 lora_root=str(root)))
    server.outside = outside
    yield server
    server.stop()
    engine.shutdown()


def _load(srv, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(srv.url + "/v1/load_lora_adapter", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(("path", "why"), [
    ("../outside/secret", "'..' is not allowed"),
    ("good/../../x", "'..' is not allowed"),
    ("link-out", "must lie under --lora-root"),
])
def test_paths_outside_the_root_are_refused(srv, path, why):
    r = _load(srv, {"lora_name": "evil", "lora_path": path})
    assert r.status_code == 400 and why in r.json()["error"]["message"], r.text


def test_an_absolute_path_outside_the_root_is_refused(srv):
    r = _load(srv, {"lora_name": "evil", "lora_path": str(srv.outside / "secret")})
    assert r.status_code == 400 and "must lie under --lora-root" in r.text


def test_the_routes_need_the_api_key(srv):
    assert _load(srv, {"lora_name": "x", "lora_path": "good"}, key=None).status_code == 401
    r = httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "x"}, timeout=30)
    assert r.status_code == 401


@pytest.mark.parametrize(("body", "status", "why"), [
    ({"lora_name": "big", "lora_path": "big"}, 400, "rank 32 is above max_lora_rank 16"),
    ({"lora_name": "bj", "lora_path": "badjson"}, 400, "adapter_config.json is not valid JSON"),
    ({"lora_name": "none", "lora_path": "missing"}, 400, "no such adapter directory"),
    ({"lora_name": "x" * 300, "lora_path": "good"}, 400, "lora_name"),
    ({"lora_name": "tiny", "lora_path": "good"}, 400, "already loaded"),
])
def test_bad_adapters_fail_their_load_with_the_reason_and_the_server_keeps_serving(srv, body, status, why):
    r = _load(srv, body)
    assert r.status_code == status and why in r.text, r.text
    ok = httpx.post(srv.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                    json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3})
    assert ok.status_code == 200, ok.text


def test_an_unknown_adapter_name_is_a_404(srv):
    r = httpx.post(srv.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "no-such-adapter", "prompt": [5, 6], "max_tokens": 2})
    assert r.status_code == 404 and json.loads(r.text)["error"]["code"] == "model_not_found"
