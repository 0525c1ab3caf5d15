"""Fault isolation: a request whose model forward fails ends alone with finish_reason "error"."""

from __future__ import annotations

import asyncio

import pytest
from llmctl import LLM, SamplingParams
from llmctl.engine.async_llm import AsyncLLM
from llmctl.engine.errors import RequestFailedError

from tests._engine_util import _single_thread, assert_all_blocks_free  # noqa: F401

PROMPTS = ["A healthy request that must finish", "Another healthy one, with a longer prompt than the first"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
FAULTY = GREEDY.clone(extra_args={"inject_fault": "forward"})


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMCTL_ENABLE_FAULT_INJECTION", "1")  # read once, when the engine core starts
        return LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def expected(llm):
    return [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


def test_faulty_request_fails_alone(llm, expected):
    outs = llm.generate([PROMPTS[0], "this one is broken", PROMPTS[1]], [GREEDY, FAULTY, GREEDY], use_tqdm=False)
    bad = outs[1]
    assert bad.finished and bad.outputs[0].finish_reason == "error"
    assert bad.error and "inject" in bad.error
    for out, ref in zip([outs[0], outs[2]], expected):
        assert out.outputs[0].finish_reason == "length" and out.outputs[0].token_ids == ref
    assert_all_blocks_free(llm.get_stats())


def test_faulty_n_request_and_engine_keeps_working(llm, expected):
    outs = llm.generate(["broken n=3", PROMPTS[1]], [FAULTY.clone(n=3, temperature=1.0), GREEDY], use_tqdm=False)
    assert [c.finish_reason for c in outs[0].outputs] == ["error"] * 3
    assert outs[1].outputs[0].token_ids == expected[1]
    assert_all_blocks_free(llm.get_stats())
    assert llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected[0]


def test_async_faulty_request_raises_and_others_finish(llm, expected):
    engine = AsyncLLM(llm.engine_args, engine=llm.llm_engine)

    async def healthy(prompt: str, rid: str):
        last = None
        async for out in engine.generate(prompt, GREEDY, request_id=rid):
            last = out
        return last

    async def faulty():
        with pytest.raises(RequestFailedError) as e:
            async for _ in engine.generate("broken async", FAULTY, request_id="bad"):
                pass
        return e.value

    async def main():
        return await asyncio.gather(healthy(PROMPTS[0], "ok0"), faulty(), healthy(PROMPTS[1], "ok1"))

    try:
        ok0, err, ok1 = asyncio.run(main())
        assert err.request_id == "bad" and "inject" in err.message
        assert ok0.outputs[0].token_ids == expected[0] and ok1.outputs[0].token_ids == expected[1]
        assert engine.is_running and not engine.errored
        engine.check_health()
    finally:
        engine.shutdown()
    assert_all_blocks_free(llm.get_stats())
