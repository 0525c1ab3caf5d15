"""Every native family against transformers: a tiny random checkpoint with its quirks on, run through the whole
engine (paged KV cache, chunked prefill, the platform's backend or the reference where a feature needs it).

fp32 greedy tokens must be identical to transformers ``generate`` and the top-5 logprobs within 1e-3. The
sliding-window model (Gemma 2) and a MoE model (Mixtral) must also be batch invariant under chunked prefill and
give the same tokens with prefix-cache hits as without.
"""

from __future__ import annotations

import pytest
import torch
from llmctl import LLM, SamplingParams
from llmctl.models.supported import MODELS

from tests._engine_util import _single_thread, assert_all_blocks_free  # noqa: F401
from tests.family_factory import make_family_model
from tests.test_engine_vs_transformers import PROMPTS, assert_matches_hf

FAMILY_KINDS = ("gemma", "gemma2", "gemma3", "phi3", "phi", "gpt2", "gptj", "gpt_neox", "opt", "bloom", "falcon_new",
                "falcon_mq", "falcon_alibi", "mpt", "starcoder2", "stablelm", "olmo", "olmo2", "granite", "cohere",
                "glm4", "internlm2", "internlm2_bias", "mixtral", "qwen2_moe", "qwen3_moe", "granitemoe", "dbrx",
                "deepseek_v2", "deepseek_v3")
# Short and long (past the 8-token windows and over several 16-token blocks), ASCII and not.
FAMILY_PROMPTS = [PROMPTS[1], PROMPTS[5], PROMPTS[6]]
SMALL_KV = 4 << 20  # bytes: a few hundred blocks of these tiny models, quick to allocate


@pytest.fixture(scope="session")
def family_dir(model_cache_dir, test_tokenizer):
    made = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = make_family_model(kind, model_cache_dir / f"family-{kind}", test_tokenizer)
        return made[kind]

    return get


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_family_matches_transformers(kind, family_dir, test_tokenizer):
    path, hf_model = family_dir(kind)
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=32, num_threads=1, kv_cache_memory=SMALL_KV)
    assert_matches_hf(path, llm, {}, FAMILY_PROMPTS, model=hf_model, tok=test_tokenizer)


def test_registry_names_a_covering_test_for_every_architecture():
    covered = {f"tests/test_model_families.py::test_family_matches_transformers[{k}]" for k in FAMILY_KINDS}
    for info in MODELS:
        if info.test.startswith("tests/test_model_families.py"):
            assert info.test in covered, info


SHARED = "A long shared system prompt that several requests start with, longer than a window. " * 2
QUESTIONS = ["First question?", "Second question, a little longer than the first one!", "Third.", "Fourth: yes?"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)


@pytest.mark.parametrize("kind", ["gemma2", "mixtral"])
def test_batch_invariance_and_prefix_cache(kind, family_dir):
    """Batched with 16-token prefill chunks and prefix-cache hits == each request alone without a cache."""
    path = str(family_dir(kind)[0])
    alone_llm = LLM(path, dtype="float32", num_threads=1, enable_prefix_caching=False)
    prompts = [SHARED + q for q in QUESTIONS]
    alone = [alone_llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0] for p in prompts]
    del alone_llm
    llm = LLM(path, dtype="float32", num_threads=1, max_num_batched_tokens=16)
    first = llm.generate(prompts[0], GREEDY, use_tqdm=False)[0]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.get_stats()["prefix_cache_hit_tokens"] > 0
    assert all(o.num_cached_tokens > 0 for o in outs)
    for i, (out, ref) in enumerate(zip([first, *outs], [alone[0], *alone])):
        got = out.outputs[0]
        assert got.token_ids == ref.token_ids, f"request {i} differs when batched / cached"
        for lp, ref_lp in zip(got.logprobs, ref.logprobs):
            tid = next(iter(ref_lp))
            assert abs(lp[tid].logprob - ref_lp[tid].logprob) < 1e-4
    assert_all_blocks_free(llm.get_stats())


def test_models_doc_is_generated_from_the_registry():
    """docs/models.md is ``python -m llmctl.models.supported``'s output; regenerate it when the table changes."""
    from pathlib import Path

    from llmctl.models.supported import render_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "models.md"
    assert doc.read_text() == render_markdown(), "docs/models.md is stale: python -m llmctl.models.supported > it"


def test_backend_without_a_feature_is_skipped_or_refused(family_dir):
    """Soft-capping and ALiBi are declared features: a backend whose ``supports`` does not take one (the CPU
    backend lacks ALiBi) is passed over for the torch reference, and naming it explicitly is a clear error, never a
    wrong result. The CPU backend takes soft-capping, so Gemma 2 runs on it."""
    from llmctl.engine.core import EngineCore
    from llmctl.plugins import get_plugin_manager
    from llmctl.plugins.types import FEATURE_ALIBI, FEATURE_LOGITS_SOFT_CAP

    cpu = next((b for b in get_plugin_manager().registry.backends_for("cpu") if b.name == "cpu-sdpa"), None)
    if cpu is None:
        pytest.skip("the CPU plugin is not installed")
    assert not cpu.supports(torch.float32, 16, 16, frozenset({FEATURE_ALIBI}))
    assert cpu.supports(torch.float32, 16, 16, frozenset({FEATURE_LOGITS_SOFT_CAP}))
    bloom = LLM(str(family_dir("bloom")[0]), dtype="float32", num_threads=1)
    assert bloom.llm_engine.core.attention.name == "torch-reference"
    for kind in ("gemma2", "mixtral"):
        llm = LLM(str(family_dir(kind)[0]), dtype="float32", num_threads=1)
        assert llm.llm_engine.core.attention.name == "cpu-sdpa"
    from llmctl.config import EngineArgs

    with pytest.raises(ValueError, match="cpu-sdpa.*cannot run this model: features not supported: alibi"):
        EngineCore(EngineArgs(model=str(family_dir("bloom")[0]), dtype="float32", attention_backend="cpu-sdpa"))


def test_internlm2_wrong_wqkv_grouping_fails(model_cache_dir, test_tokenizer):
    """The InternLM2 oracle can fail: the same weights with wqkv packed as one q block, then k, then v (not per KV
    group) have the same shapes and load, but no longer match the Llama they came from."""
    from tests.family_factory import make_internlm2_model

    def concatenated(q, k, v, num_kv_heads, head_dim):
        return torch.cat([q, k, v])

    path, llama = make_internlm2_model("internlm2", model_cache_dir / "internlm2-concat-wqkv", test_tokenizer,
                                       pack=concatenated)
    llm = LLM(str(path), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV)
    with pytest.raises(AssertionError, match="greedy tokens differ|top-5 token"):
        assert_matches_hf(path, llm, {}, FAMILY_PROMPTS, model=llama, tok=test_tokenizer)


def test_internlm2_loads_without_remote_code(family_dir, tmp_path):
    """config.json's auto_map names InternLM2's remote config class; the native class needs none of it, so the
    checkpoint loads with trust_remote_code off. A remote-code architecture llmctl lacks still asks for the flag."""
    import json
    import shutil

    from llmctl.loader.source import resolve_model

    path = family_dir("internlm2")[0]
    source = resolve_model(str(path), trust_remote_code=False)
    assert source.hf_config.architectures == ["InternLM2ForCausalLM"]
    assert source.hf_config.model_type == "internlm2"
    other = tmp_path / "remote"
    shutil.copytree(path, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["SomeRemoteForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code is off by default"):
        resolve_model(str(other), trust_remote_code=False)
