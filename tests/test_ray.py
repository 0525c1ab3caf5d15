"""The Ray integrations on one local Ray instance started here (2 CPUs, no dashboard, nothing external), shared by
the module (a Ray start costs seconds of both cores): the ``ray`` executor, where tp=2 and pp=2 give the tokens of
one process and a killed rank actor ends the engine with ``EngineDeadError``, and then Ray Serve, whose proxy
serves the OpenAI routes, checked against the offline engine on the same checkpoint. The Serve application starts
after the executor's tests (its replica holds a CPU that their placement groups need) and stops with its test."""

from __future__ import annotations

import time

import httpx
import pytest
from llmctl import LLM, SamplingParams
from llmctl_server import ServerSettings

from tests._engine_util import one_torch_thread
from tests.model_factory import make_tiny_model
from tests.test_server_support import free_port, parse_stream
from tests.tp_rank import PROMPTS, generate

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'ray[default]'")

KV = 16 << 20
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model(tmp_path_factory, test_tokenizer):
    return make_tiny_model("llama", tmp_path_factory.mktemp("tp-ray") / "llama", test_tokenizer,
                           num_key_value_heads=1)


def test_ray_unreachable_address_fails_at_once(model, monkeypatch):
    if ray.is_initialized():  # runs before local_ray below starts one, when the module runs in order
        pytest.skip("a Ray instance is already attached in this process")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"distributed_executor_backend: Ray is not reachable at RAY_ADDRESS="):
        LLM(str(model), tensor_parallel_size=2, distributed_executor_backend="ray", num_threads=1)
    assert time.monotonic() - start < 30


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_process(model):
    """The greedy tokens and logprobs of one process: what every split must give."""
    with one_torch_thread():
        return generate(LLM(str(model), dtype="float32", num_threads=1, seed=0))


def _assert_same_outputs(got: list[dict], want: list[dict]) -> None:
    import torch

    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]), atol=1e-4, rtol=1e-4)


def test_ray_tp2_matches_tp1_and_a_killed_actor_is_engine_dead(model, one_process, local_ray):
    from llmctl.engine.errors import EngineDeadError

    llm = LLM(str(model), dtype="float32", tensor_parallel_size=2, distributed_executor_backend="ray",
              num_threads=1, seed=0)
    try:
        _assert_same_outputs(generate(llm), one_process)
        core = llm.llm_engine.core
        ray.kill(core.actors[1], no_restart=True)
        with pytest.raises(EngineDeadError, match="engine workers died: .*rank 1"):
            llm.generate(PROMPTS, SamplingParams(max_tokens=20), use_tqdm=False)
        assert core.actors == []  # every actor killed, the placement group removed
        deadline = time.monotonic() + 20  # Ray returns the resources asynchronously
        while ray.available_resources().get("CPU") != 2.0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU") == 2.0
    finally:
        llm.llm_engine.shutdown()


def test_ray_more_ranks_than_the_cluster_holds_is_refused(model, local_ray, monkeypatch):
    monkeypatch.setattr("llmctl.executor.ray_executor.PLACEMENT_TIMEOUT_S", 3.0)
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 4 ranks need 4 x \{'CPU': 1.0\}"):
        LLM(str(model), dtype="float32", tensor_parallel_size=4, distributed_executor_backend="ray", num_threads=1)


def test_ray_pp2_matches_pp1(model, one_process, local_ray):
    llm = LLM(str(model), dtype="float32", pipeline_parallel_size=2, distributed_executor_backend="ray",
              num_threads=1, seed=0)
    try:
        got = generate(llm)
    finally:
        llm.llm_engine.shutdown()
    _assert_same_outputs(got, one_process)


@pytest.fixture
def ray_app(local_ray, tiny_llama_dir):
    serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'ray[serve]'")
    from llmctl_server.ray_serve import build_llm_app

    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_llm_app({"model": str(tiny_llama_dir), "kv_cache_memory": KV, "seed": 0},
                            ServerSettings(served_model_names=["tiny"], api_key="sk-ray"),
                            max_replicas=2, target_ongoing_requests=4, ray_actor_options={"num_cpus": 1})
        serve.run(app, name="llmctl", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


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
