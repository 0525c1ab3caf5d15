"""Greedy tokens and top-5 logprobs agree with Hugging Face transformers (fp32)."""

from __future__ import annotations

import pytest
import torch
from llmctl import LLM, SamplingParams
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "Hi",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "List three colours: red,",
    "In 1492, Columbus sailed across the Atlantic Ocean and reached the islands of the Caribbean, which he believed "
    "were part of",
    "Ünïcödé text — 日本語 and emoji 🎉 mixed in",
    "a " * 40 + "b",
]
MAX_TOKENS = 12


def hf_greedy(model, tok, prompt: str, n: int) -> tuple[list[int], torch.Tensor]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id or 0)
        full = out[0]
        logits = model(full.unsqueeze(0)).logits[0, ids.shape[1] - 1:-1]
    return full[ids.shape[1]:].tolist(), logits.float().log_softmax(-1)


def assert_matches_hf(model_dir, llm: LLM, hf_kwargs: dict, prompts: list[str], model=None, tok=None) -> None:
    """``model`` / ``tok``: the transformers model and tokenizer already in memory (else loaded from
    ``model_dir``)."""
    tok = tok or AutoTokenizer.from_pretrained(model_dir, **hf_kwargs)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **hf_kwargs).eval()
    # transformers stops at EOS (and its min_new_tokens would mask EOS), so ours stops there too.
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref_tokens, ref_lp = hf_greedy(model, tok, prompt, MAX_TOKENS)
        got = out.outputs[0]
        assert got.token_ids == ref_tokens, f"greedy tokens differ for {prompt!r}"
        for pos, lp_dict in enumerate(got.logprobs):
            top_vals, top_ids = ref_lp[pos].topk(5)
            for tid, val in zip(top_ids.tolist(), top_vals.tolist()):
                assert tid in lp_dict, f"top-5 token {tid} missing at position {pos} for {prompt!r}"
                assert abs(lp_dict[tid].logprob - val) < 1e-3
    stats = llm.get_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "llama_tied"])
def test_tiny_models_match_transformers(kind, tiny_model_dirs):
    model_dir = tiny_model_dirs[kind]
    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=64)
    assert_matches_hf(model_dir, llm, {}, PROMPTS)


def test_smollm2_gguf_matches_transformers(smollm2_gguf, smollm2_hf_fp32, smollm2_hf_tokenizer):
    llm = LLM(str(smollm2_gguf), dtype="float32")
    tok = llm.get_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    # Four prompts, not all eight: transformers' fp32 generate is the slow half of this test, and the tiny models
    # above already run every prompt; these keep a chat template, a long prompt, code and multi-byte text.
    prompts = [chat, PROMPTS[3], PROMPTS[5], PROMPTS[6]]
    assert_matches_hf(str(smollm2_gguf.parent), llm, {"gguf_file": smollm2_gguf.name}, prompts,
                      model=smollm2_hf_fp32, tok=smollm2_hf_tokenizer)
    answer = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0].text
    assert "Paris" in answer
