"""The transformers fallback: transformers' own model with llmctl's paged attention plugged into its attention
interface, compared with transformers ``generate`` like the native families (tests/test_model_families.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from llmctl import LLM

from tests._engine_util import _single_thread, assert_all_blocks_free  # noqa: F401
from tests.family_factory import _ids, _llama_like, make_family_model
from tests.test_engine_vs_transformers import assert_matches_hf
from tests.test_model_families import FAMILY_PROMPTS


@pytest.fixture(scope="module")
def smollm3(model_cache_dir, test_tokenizer):
    """An architecture llmctl does not implement natively (SmolLM3: RoPE skipped on every second layer)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.SmolLM3Config(**_llama_like(test_tokenizer), **_ids(test_tokenizer), no_rope_layer_interval=2)
    model = tf.SmolLM3ForCausalLM(config).eval()
    path = model_cache_dir / "fallback-smollm3"
    model.save_pretrained(path)
    test_tokenizer.save_pretrained(path)
    return path, model


def test_non_native_architecture_runs_through_the_fallback(smollm3, caplog, test_tokenizer):
    path, hf_model = smollm3
    with caplog.at_level(logging.INFO, logger="llmctl.engine.core"):
        llm = LLM(str(path), dtype="float32", max_num_batched_tokens=32, num_threads=1)
    assert llm.llm_engine.core.model_impl == "transformers"
    assert any("transformers implementation" in r.getMessage() for r in caplog.records)
    assert_matches_hf(path, llm, {}, FAMILY_PROMPTS, model=hf_model, tok=test_tokenizer)
    # Batched with prefix-cache hits (the shared prompt spans full blocks) == each alone.
    shared = FAMILY_PROMPTS[1] + " "
    prompts = [shared + "one", shared + "and two"]
    from llmctl import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    alone = [llm.generate(p, greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    batched = llm.generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched] == alone
    assert all(o.num_cached_tokens > 0 for o in batched)
    assert_all_blocks_free(llm.get_stats())


def test_forced_fallback_keeps_soft_cap_and_sliding_window(model_cache_dir, test_tokenizer, caplog):
    """``model_impl="transformers"`` on a native architecture: Gemma 2's soft-capping and sliding window reach
    the backend through the attention interface's arguments."""
    path, hf_model = make_family_model("gemma2", model_cache_dir / "fallback-gemma2", test_tokenizer)
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=32, num_threads=1, model_impl="transformers")
    core = llm.llm_engine.core
    # the CPU backend takes soft-capping since its kernels do; without them the reference backend does
    assert core.model_impl == "transformers" and core.attention.name in ("cpu-sdpa", "torch-reference")
    assert_matches_hf(path, llm, {}, FAMILY_PROMPTS, model=hf_model, tok=test_tokenizer)


def test_hf_overrides_reach_the_model(model_cache_dir, test_tokenizer):
    path, _ = make_family_model("gemma2", model_cache_dir / "overrides-gemma2", test_tokenizer)
    llm = LLM(str(path), dtype="float32", num_threads=1,
              hf_overrides='{"final_logit_softcapping": 1.5, "attn_logit_softcapping": null}')
    model = llm.llm_engine.core.model
    assert model.spec.final_soft_cap == 1.5 and model.spec.attn_soft_cap is None
    logits = model.compute_logits(torch.randn(3, 64) * 100)
    assert float(logits.abs().max()) <= 1.5
