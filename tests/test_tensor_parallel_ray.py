"""The ``ray`` executor on a local Ray instance started here (2 CPUs, no dashboard, nothing external): tp=2 gives
the tokens of one process, and a killed rank actor ends the engine with ``EngineDeadError``."""

from __future__ import annotations

import time

import pytest

from tests._engine_util import one_torch_thread
from tests.model_factory import make_tiny_model
from tests.tp_rank import PROMPTS, generate

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'ray[default]'")


@pytest.fixture(scope="module")
def model(tmp_path_factory, test_tokenizer):
    return make_tiny_model("llama", tmp_path_factory.mktemp("tp-ray") / "llama", test_tokenizer,
                           num_key_value_heads=1)


def test_ray_unreachable_address_fails_at_once(model, monkeypatch):
    from llmctl import LLM

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


def test_ray_tp2_matches_tp1_and_a_killed_actor_is_engine_dead(model, local_ray):
    import torch
    from llmctl import LLM, SamplingParams
    from llmctl.engine.errors import EngineDeadError

    with one_torch_thread():
        want = generate(LLM(str(model), dtype="float32", num_threads=1, seed=0))
    llm = LLM(str(model), dtype="float32", tensor_parallel_size=2, distributed_executor_backend="ray",
              num_threads=1, seed=0)
    try:
        got = generate(llm)
        for g, w in zip(got, want, strict=True):
            assert g["tokens"] == w["tokens"]
            torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]), atol=1e-4,
                                       rtol=1e-4)
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
    from llmctl import LLM

    monkeypatch.setattr("llmctl.executor.ray_executor.PLACEMENT_TIMEOUT_S", 3.0)
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 4 ranks need 4 x \{'CPU': 1.0\}"):
        LLM(str(model), dtype="float32", tensor_parallel_size=4, distributed_executor_backend="ray", num_threads=1)



def test_ray_pp2_matches_pp1(model, local_ray):
    import torch
    from llmctl import LLM

    with one_torch_thread():
        want = generate(LLM(str(model), dtype="float32", num_threads=1, seed=0))
    llm = LLM(str(model), dtype="float32", pipeline_parallel_size=2, distributed_executor_backend="ray",
              num_threads=1, seed=0)
    try:
        got = generate(llm)
    finally:
        llm.llm_engine.shutdown()
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]), atol=1e-4, rtol=1e-4)
