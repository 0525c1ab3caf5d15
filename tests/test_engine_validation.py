"""Bad input is rejected with a ValueError naming the field, before any KV block is allocated."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from llmctl import LLM, SamplingParams
from llmctl.engine.async_llm import AsyncLLM

from tests._engine_util import _single_thread, assert_all_blocks_free  # noqa: F401

MAX_LEN = 128


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, max_model_len=MAX_LEN)


def steady(stats: dict) -> dict:
    keep = ("kv_blocks_total", "kv_blocks_free", "prefix_cache_queried_tokens", "prefix_cache_hit_tokens",
            "num_running", "num_waiting", "num_steps")
    return {k: stats[k] for k in keep}


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=-1), "top_p"),
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(logprobs=-1), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert str(e.value).startswith(f"{field}:"), str(e.value)


def test_bad_prompts_name_the_field_and_leak_nothing(llm):
    tok = llm.get_tokenizer()
    before = steady(llm.get_stats())
    long_prompt = "word " * (MAX_LEN + 10)
    n_long = len(tok.encode(long_prompt))
    cases = [
        (long_prompt, SamplingParams(max_tokens=4), "prompt", [str(n_long), str(MAX_LEN)]),
        ({"prompt_token_ids": [5] * 100}, SamplingParams(max_tokens=40), "", ["100", "40", str(MAX_LEN)]),
        ("", SamplingParams(), "prompt", []),
        ({"prompt_token_ids": []}, SamplingParams(), "prompt", []),
        ({"prompt_token_ids": [1, 2, llm.llm_engine.model_config.vocab_size]}, SamplingParams(), "prompt_token_ids",
         [str(llm.llm_engine.model_config.vocab_size)]),
        ({"prompt_token_ids": [1, -1]}, SamplingParams(), "prompt_token_ids", ["-1"]),
        ([None], SamplingParams(), "prompt", []),
        ({"text": "wrong key"}, SamplingParams(), "prompt", []),
    ]
    for prompt, params, field, numbers in cases:
        with pytest.raises(ValueError) as e:
            llm.generate(prompt, params, use_tqdm=False)
        msg = str(e.value)
        if field:
            assert msg.startswith(f"{field}:"), msg
        else:  # prompt + max_tokens over the limit: either field may lead, both must be named
            assert msg.split(":")[0] in ("prompt", "max_tokens") and "max_tokens" in msg and "prompt" in msg, msg
        for number in numbers:
            assert number in msg, (number, msg)
        assert steady(llm.get_stats()) == before, f"state changed after rejecting {prompt!r}"
    # A bad prompt in a batch rejects the batch without leaving the good ones holding blocks.
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(["fine prompt", "another fine one", ""], SamplingParams(max_tokens=4), use_tqdm=False)
    assert steady(llm.get_stats())["kv_blocks_free"] == before["kv_blocks_free"]
    assert_all_blocks_free(llm.get_stats())
    ok = llm.generate("fine prompt", SamplingParams(max_tokens=MAX_LEN - len(tok.encode("fine prompt"))),
                      use_tqdm=False)[0]
    assert ok.finished
    assert_all_blocks_free(llm.get_stats())


def test_async_rejection_raises_before_allocation(llm):
    engine = AsyncLLM(llm.engine_args, engine=llm.llm_engine)

    async def main():
        with pytest.raises(ValueError, match="^max_tokens: "):
            async for _ in engine.generate("hello", SamplingParams(max_tokens=MAX_LEN), request_id="too-long"):
                pass

    try:
        asyncio.run(main())
        assert engine.num_unfinished == 0
    finally:
        engine.shutdown()
    assert_all_blocks_free(llm.get_stats())


def test_unknown_model_path():
    with pytest.raises(ValueError) as e:
        LLM("/definitely/not/a/model/dir", num_threads=1)
    assert str(e.value).startswith("model:") and "/definitely/not/a/model/dir" in str(e.value)


def test_unsupported_architecture(tiny_llama_dir, tmp_path):
    bad = tmp_path / "foo-model"
    shutil.copytree(tiny_llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        LLM(str(bad), dtype="float32", num_threads=1)
    msg = str(e.value)
    assert msg.startswith("model:") and "FooForCausalLM" in msg
    assert "LlamaForCausalLM" in msg and "Qwen2ForCausalLM" in msg  # lists the supported ones


@pytest.mark.parametrize("dtype", ["float8", "int4", 3])
def test_bad_dtype(tiny_llama_dir, dtype):
    with pytest.raises(ValueError) as e:
        LLM(str(tiny_llama_dir), dtype=dtype, num_threads=1)
    assert str(e.value).startswith("dtype:")


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_model_len=0), "max_model_len"),
    (dict(max_model_len=10**6), "max_model_len"),
    (dict(block_size=3), "block_size"),
    (dict(kv_cache_memory=1.5), "kv_cache_memory"),
    (dict(kv_cache_memory=100), "kv_cache_memory"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_batched_tokens=4), "max_num_batched_tokens"),
    (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=True), "gpu_memory_utilization"),
    (dict(enforce_eager="yes"), "enforce_eager"),
    (dict(no_such_arg=1), "no_such_arg"),
])
def test_bad_engine_args(tiny_llama_dir, kwargs, field):
    with pytest.raises(ValueError) as e:
        LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, **kwargs)
    assert str(e.value).startswith(f"{field}:"), str(e.value)
