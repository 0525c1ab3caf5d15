"""The real default model (the SmolLM2 GGUF, bf16 activations) with an 8-bit KV cache against its bf16 cache.

Two figures per dtype, printed (run with ``-s``) and recorded in docs/quantization.md:
* teacher-forced top-1 agreement: the bf16 cache's greedy continuations are fed back as prompts, and at each of
  their positions the 8-bit cache's most likely token is compared with the one the bf16 cache chose (one
  prefill, so every position is judged on the same context), with the largest difference of that token's logprob;
* free-running agreement: greedy tokens of both caches, each sequence counted up to its first difference.
"""

from __future__ import annotations

import gc

import pytest
from llmctl import LLM, SamplingParams

ENGINE = dict(dtype="bfloat16", max_model_len=512, kv_cache_memory=64 << 20, max_num_batched_tokens=512)
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The largest planet in our solar system is",
    "Water boils at a temperature of",
    "The three primary colors are",
]
MAX_TOKENS = 32

pytestmark = pytest.mark.slow


def _teacher_forced(llm: LLM, prompt_ids: list[list[int]], n_prompt: list[int]) -> list[list[tuple[int, float]]]:
    """(rank, logprob) of each continuation token given everything before it."""
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                        SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    rows = []
    for out, ids, start in zip(outs, prompt_ids, n_prompt, strict=True):
        rows.append([(out.prompt_logprobs[p][ids[p]].rank, out.prompt_logprobs[p][ids[p]].logprob)
                     for p in range(start, len(ids))])
    return rows


@pytest.fixture(scope="module")
def bf16_run(smollm2_gguf):
    llm = LLM(str(smollm2_gguf), **ENGINE)
    tok = llm.get_tokenizer()
    greedy = [list(o.outputs[0].token_ids) for o in llm.generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)]
    prompt_ids = [tok.encode(p) + g for p, g in zip(PROMPTS, greedy, strict=True)]
    n_prompt = [len(tok.encode(p)) for p in PROMPTS]
    forced = _teacher_forced(llm, prompt_ids, n_prompt)
    del llm
    gc.collect()
    return greedy, prompt_ids, n_prompt, forced


@pytest.mark.parametrize("name", ["int8", "fp8", "fp8_e5m2"])
def test_smollm2_8bit_kv_cache_agrees_with_bf16(smollm2_gguf, bf16_run, name):
    greedy, prompt_ids, n_prompt, forced_bf16 = bf16_run
    llm = LLM(str(smollm2_gguf), kv_cache_dtype=name, **ENGINE)
    backend = llm.llm_engine.core.attention.name
    ours = [list(o.outputs[0].token_ids) for o in llm.generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)]
    forced = _teacher_forced(llm, prompt_ids, n_prompt)
    del llm
    gc.collect()
    positions = [(r, lp, lp_ref) for row, ref in zip(forced, forced_bf16, strict=True)
                 for (r, lp), (_, lp_ref) in zip(row, ref, strict=True)]
    top1 = sum(r == 1 for r, _, _ in positions) / len(positions)
    top1_bf16 = sum(r == 1 for row in forced_bf16 for r, _ in row) / len(positions)
    max_diff = max(abs(lp - lp_ref) for _, lp, lp_ref in positions)
    same = 0
    for a, b in zip(ours, greedy, strict=True):
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    free = same / sum(map(len, greedy))
    print(f"\n[kv {name}] SmolLM2 (bf16, {backend}): teacher-forced top-1 agreement with the bf16 cache's greedy "
          f"tokens {top1:.1%} of {len(positions)} (the bf16 cache's own prefill: {top1_bf16:.1%}); max |logprob "
          f"diff| {max_diff:.3f}; free-running greedy agreement {free:.1%}")
    assert top1 >= {"int8": 0.9, "fp8": 0.85, "fp8_e5m2": 0.75}[name]
