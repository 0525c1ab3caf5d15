"""A real draft model: SmolLM2-135M cut to its first layers (built here from the packaged GGUF) drafting for the
whole SmolLM2 in float32. The draft agrees with the target part of the time; greedy output is token-identical to
decoding without speculation."""

from __future__ import annotations

import pytest
from llmctl import LLM, SamplingParams

from tests._engine_util import assert_all_blocks_free
from tests.model_factory import make_truncated_smollm2

DRAFT_LAYERS = 24  # of 30: with fewer, SmolLM2's first layers agree with the whole model almost never


@pytest.fixture(scope="module")
def smollm2_draft_dir(model_cache_dir, smollm2_gguf):
    return make_truncated_smollm2(model_cache_dir / f"smollm2-{DRAFT_LAYERS}layers", DRAFT_LAYERS)


def test_truncated_smollm2_draft_greedy_identical(smollm2_gguf, smollm2_draft_dir):
    spec = LLM(str(smollm2_gguf), dtype="float32", num_threads=1, kv_cache_memory=64 << 20, max_model_len=2048,
               speculative_config={"model": str(smollm2_draft_dir), "num_speculative_tokens": 3})
    prompts = [[{"role": "user", "content": "Name three colours."}],
               [{"role": "user", "content": "Repeat exactly: the quick brown fox jumps over the lazy dog."}]]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    core = spec.llm_engine.core
    speculator, core.speculator = core.speculator, None  # the same engine without speculation is the reference
    ref = [o.outputs[0] for o in spec.chat(prompts, params, use_tqdm=False)]
    core.speculator = speculator
    got = [o.outputs[0] for o in spec.chat(prompts, params, use_tqdm=False)]
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert [g.text for g in got] == [r.text for r in ref]
    stats = spec.get_stats()
    # a real draft: some drafts accepted, not all
    assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"], stats
    assert_all_blocks_free(stats)
