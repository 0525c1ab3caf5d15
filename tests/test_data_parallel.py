"""Data parallelism: two replicas behind one engine frontend give one engine's greedy tokens, both work on a
concurrent batch, a repeated prompt goes back to the replica that cached it, and the stats add up. With
``enable_expert_parallel`` on a mixture-of-experts model the replicas share their experts and step in lockstep."""

from __future__ import annotations

import pytest

from tests._engine_util import one_torch_thread
from tests.model_factory import make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory, test_tokenizer):
    return make_tiny_model("llama", tmp_path_factory.mktemp("dp") / "llama", test_tokenizer)


def test_dp2_serves_from_both_replicas_with_one_engines_tokens(model):
    from llmctl import LLM, SamplingParams

    prompts = [f"Question {i}: what comes after {i}?" for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with one_torch_thread():
        want = [o.outputs[0].token_ids for o in LLM(str(model), dtype="float32", num_threads=1)
                .generate(prompts, params, use_tqdm=False)]
    llm = LLM(str(model), dtype="float32", data_parallel_size=2, num_threads=1)
    try:
        core = llm.llm_engine.core
        assert len(core.replicas) == 2
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == want
        stats = llm.get_stats()
        steps = [r["num_steps"] for r in stats["replicas"]]
        assert all(s > 0 for s in steps), steps  # both replicas worked
        assert stats["num_steps"] == sum(steps)
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == sum(r["kv_blocks_total"]
                                                                          for r in stats["replicas"])

        # prefix affinity: the long prompt lands on replica 1 (replica 0 took the filler first); later, with both
        # idle, load alone would pick replica 0, but the shared prefix sends it back to replica 1's cache
        long_prompt = "The same long system prompt, repeated word for word. " * 4
        llm.generate(["A filler prompt", long_prompt + "First."], params, use_tqdm=False)
        before = [r["prefix_cache_hit_tokens"] for r in llm.get_stats()["replicas"]]
        llm.generate([long_prompt + "Second."], params, use_tqdm=False)
        after = [r["prefix_cache_hit_tokens"] for r in llm.get_stats()["replicas"]]
        assert after[0] == before[0] and after[1] - before[1] >= 16, (before, after)
    finally:
        llm.llm_engine.shutdown()


def test_dp_arguments_are_checked():
    from llmctl.config import EngineArgs

    with pytest.raises(ValueError, match="data_parallel_size: must be an integer >= 1"):
        EngineArgs(model="m", data_parallel_size=0)
    with pytest.raises(ValueError, match="data_parallel_size: replicas run as worker processes"):
        EngineArgs(model="m", data_parallel_size=2, distributed_executor_backend="external_launcher")
    with pytest.raises(ValueError, match="enable_lora: not supported with data_parallel_size"):
        EngineArgs(model="m", data_parallel_size=2, enable_lora=True)


def test_serve_dp2_answers_concurrent_requests_from_both_replicas(model):
    """``llmctl serve -dp 2``: concurrent completions all succeed, and /metrics shows steps on both engines."""
    import os
    import re
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import httpx

    from tests.test_server_process import _wait_health
    from tests.test_server_support import free_port

    port = free_port()
    log = model.parent / f"dp-server-{port}.log"  # a file: a pipe nobody reads can fill and block the server
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "llmctl"), "serve", str(model), "-dp", "2",
                                 "--port", str(port), "--kv-cache-memory", "16MiB", "--log-level", "warning",
                                 "--served-model-name", "tiny", "--metrics-prefix", "vllm"],
                                stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "LLMCTL_CPU_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_health(url, proc, timeout=180, log=log)

        def complete(i: int) -> int:
            body = {"model": "tiny", "prompt": f"Request number {i} asks", "max_tokens": 16, "ignore_eos": True}
            return httpx.post(url + "/v1/completions", json=body, timeout=120).status_code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(complete, range(8))) == [200] * 8
        metrics = httpx.get(url + "/metrics", timeout=30).text
        counts = dict(re.findall(r'vllm:iteration_tokens_total_count\{engine="(\d)",model_name="tiny"\} (\S+)',
                                 metrics))
        assert set(counts) == {"0", "1"} and all(float(c) > 0 for c in counts.values()), counts
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


@pytest.fixture(scope="module")
def moe_model(model_cache_dir, test_tokenizer):
    from tests.test_tensor_parallel_families import _family_checkpoint

    return _family_checkpoint("qwen2_moe", model_cache_dir, test_tokenizer)


def test_dp2_expert_parallel_gives_one_engines_tokens_and_dies_cleanly(moe_model):
    """DP=2 with expert parallelism on Qwen2-MoE (4 experts, 2 per replica; a dense layer and a shared expert
    among them): prompts of different lengths on both replicas, one replica idle (running its MoE layers on no
    tokens) while the other finishes its longer request, give the greedy tokens of one engine without expert
    parallelism in fp32. Then a killed rank of one replica ends the whole engine (the data-parallel death test:
    every replica's workers stop), the other replica's ranks included, rather than leaving them inside a
    collective."""
    import os
    import signal

    from llmctl import LLM, SamplingParams

    from tests.test_tensor_parallel_mp import _assert_dies_cleanly

    prompts = ["Short one.", "A much longer prompt that goes on for a good while before it stops", "Mid length"]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (2, 12, 5)]
    with one_torch_thread():
        want = [o.outputs[0].token_ids for o in LLM(str(moe_model), dtype="float32", num_threads=1)
                .generate(prompts, params, use_tqdm=False)]
    llm = LLM(str(moe_model), dtype="float32", data_parallel_size=2, enable_expert_parallel=True, num_threads=1)
    assert llm.llm_engine.core.lockstep and len(llm.llm_engine.core.worker_pids) == 2
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    replicas = llm.get_stats()["replicas"]
    assert [(r["expert_parallel_rank"], r["expert_parallel_size"]) for r in replicas] == [(0, 2), (1, 2)]
    steps = [r["num_steps"] for r in replicas]
    assert min(steps) > 0 and steps[0] != steps[1], steps  # both worked, one of them also idled
    _assert_dies_cleanly(llm, lambda pids: os.kill(pids[1], signal.SIGKILL))


def test_dp_expert_parallel_refusals(moe_model, tiny_llama_dir, caplog, monkeypatch):
    """Experts the replicas' ranks do not divide, and what would break the lockstep, are refused before any
    replica starts, naming the setting; a dense model runs plain replicas and says so."""
    import logging

    from llmctl.config import EngineArgs
    from llmctl.executor.data_parallel import _share_experts

    with pytest.raises(ValueError, match=r"num_experts=4 does not split over the 8 ranks of data_parallel_size=4 "
                                         r"x tensor_parallel_size=2"):
        _share_experts(EngineArgs(model=str(moe_model), data_parallel_size=4, tensor_parallel_size=2,
                                  enable_expert_parallel=True))
    with pytest.raises(ValueError, match=r"pipeline_parallel_size: not supported with enable_expert_parallel "
                                         r"across data_parallel_size=2"):
        _share_experts(EngineArgs(model=str(moe_model), data_parallel_size=2, pipeline_parallel_size=2,
                                  enable_expert_parallel=True))
    monkeypatch.setenv("LLMCTL_EP_ALL2ALL", "0")
    with pytest.raises(ValueError, match=r"LLMCTL_EP_ALL2ALL: not supported with enable_expert_parallel across "
                                         r"data_parallel_size=2 replicas \(replicas have different tokens"):
        _share_experts(EngineArgs(model=str(moe_model), data_parallel_size=2, enable_expert_parallel=True))
    with caplog.at_level(logging.INFO, logger="llmctl.expert_parallel"):
        assert not _share_experts(EngineArgs(model=str(tiny_llama_dir), data_parallel_size=2,
                                             enable_expert_parallel=True))
    assert "has no mixture-of-experts layers; the setting is ignored" in caplog.text
