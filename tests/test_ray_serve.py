"""The Ray Serve integration on a local Ray instance started here (2 CPUs, no dashboard, nothing external): the
OpenAI routes through Ray Serve's proxy, checked against the offline engine on the same checkpoint."""

from __future__ import annotations

import httpx
import pytest
from llmctl import LLM, SamplingParams
from llmctl_server import ServerSettings

from tests.test_server_support import free_port, parse_stream

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'ray[serve]'")
serve = pytest.importorskip("ray.serve")

KV = 16 << 20
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def ray_app(tiny_llama_dir, tmp_path_factory):
    from llmctl_server.ray_serve import build_llm_app

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_llm_app({"model": str(tiny_llama_dir), "kv_cache_memory": KV, "seed": 0},
                            ServerSettings(served_model_names=["tiny"], api_key="sk-ray"),
                            max_replicas=2, target_ongoing_requests=4, ray_actor_options={"num_cpus": 1})
        serve.run(app, name="llmctl", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_openai_routes_through_ray_serve(ray_app, tiny_llama_dir):
    expected = LLM(model=str(tiny_llama_dir), kv_cache_memory=KV, seed=0).generate(
        [PROMPT], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    headers = {"Authorization": "Bearer sk-ray"}
    assert httpx.get(ray_app + "/v1/models", timeout=30).status_code == 401
    models = httpx.get(ray_app + "/v1/models", headers=headers, timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    r = httpx.post(ray_app + "/v1/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected
    with httpx.stream("POST", ray_app + "/v1/completions", json={**body, "stream": True}, headers=headers,
                      timeout=120) as s:
        raw = s.read().decode()
    events = parse_stream(raw)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == expected
    assert len(events) > 1
    bad = httpx.post(ray_app + "/v1/completions", json={**body, "max_tokens": -1}, headers=headers, timeout=60)
    assert bad.status_code == 400 and "max_tokens" in bad.text
    metrics = httpx.get(ray_app + "/metrics", headers=headers, timeout=30).text
    assert 'llmctl_generation_tokens_total{model_name="tiny"}' in metrics


def test_autoscaling_config_is_on_queue_length():
    from llmctl_server.ray_serve import AutoscalingOptions

    opts = AutoscalingOptions(min_replicas=1, max_replicas=4, target_ongoing_requests=8).deployment_options()
    assert opts["autoscaling_config"]["target_ongoing_requests"] == 8
    assert opts["autoscaling_config"]["max_replicas"] == 4
    with pytest.raises(ValueError, match="max_replicas"):
        AutoscalingOptions(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        AutoscalingOptions(target_ongoing_requests=32, max_ongoing_requests=8)
