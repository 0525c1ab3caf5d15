"""The native architectures: which class runs each, the quirks it implements, and the test that covers it.

This table is the single source of ``llmctl models``, of docs/models.md (``python -m llmctl.models.supported``
regenerates it; a test fails when the two disagree) and of the registrations core makes at start-up.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache
from typing import Any

from llmctl.plugins.types import ModelArchitecture

EQUALITY_TEST = "tests/test_model_families.py::test_family_matches_transformers"
LLAMA_TEST = "tests/test_engine_vs_transformers.py::test_tiny_models_match_transformers"
LLAVA_TEST = "tests/test_multimodal.py::test_llava_matches_transformers"
QWEN2_VL_TEST = "tests/test_multimodal_qwen2_vl.py::test_qwen2_vl_matches_transformers"
BART_TEST = "tests/test_encoder_decoder.py::test_bart_matches_transformers"


@dataclass(frozen=True)
class ModelInfo:
    architecture: str  # the Hugging Face ``architectures`` name
    family: str  # the decoder family (``llmctl.models.families``) or "llama"
    features: str  # the quirks implemented, in words
    test: str  # the test (and its parameter) that compares it with transformers

    @property
    def model_cls(self) -> Any:
        if self.family == "llama":
            from llmctl.models.llama import LlamaForCausalLM

            return LlamaForCausalLM
        if self.family == "llava":
            from llmctl.models.llava import ARCHITECTURE_CLASSES

            return ARCHITECTURE_CLASSES[self.architecture]
        if self.family == "qwen2_vl":
            from llmctl.models.qwen2_vl import ARCHITECTURE_CLASSES as QWEN2_VL_CLASSES

            return QWEN2_VL_CLASSES[self.architecture]
        if self.family == "bart":
            from llmctl.models.bart import ARCHITECTURES as BART_CLASSES

            return BART_CLASSES[self.architecture]
        return decoder_class(self.family)


def _fam(arch: str, family: str, features: str, kind: str | None = None) -> ModelInfo:
    return ModelInfo(arch, family, features, f"{EQUALITY_TEST}[{kind or family}]")


MODELS: tuple[ModelInfo, ...] = (
    ModelInfo("LlamaForCausalLM", "llama", "RoPE scaling (linear, dynamic, llama3, yarn), tied embeddings",
              f"{LLAMA_TEST}[llama]"),
    ModelInfo("MistralForCausalLM", "llama", "sliding window", f"{LLAMA_TEST}[mistral]"),
    ModelInfo("Qwen2ForCausalLM", "llama", "q/k/v bias, per-layer sliding window", f"{LLAMA_TEST}[qwen2]"),
    ModelInfo("Qwen3ForCausalLM", "llama", "per-head q/k RMSNorm", f"{LLAMA_TEST}[qwen3]"),
    ModelInfo("LlavaForConditionalGeneration", "llava", "image input (llava-1.5): CLIP/SigLIP tower from transformers, "
              "feature layer and CLS strategy, projector; Llama-family language model", f"{LLAVA_TEST}[llava-16]"),
    ModelInfo("LlavaNextForConditionalGeneration", "llava", "LLaVA-NeXT anyres tiling: grid pinpoints, unpadding, "
              "image_newline; an image's token count depends on its size", f"{LLAVA_TEST}[llava_next-16]"),
    ModelInfo("Qwen2VLForConditionalGeneration", "qwen2_vl", "image input: dynamic-resolution tower with the 2x2 "
              "patch merger from transformers; Qwen2 language model with M-RoPE (3-D positions for image tokens)",
              f"{QWEN2_VL_TEST}[qwen2_vl-16]"),
    ModelInfo("Qwen2_5_VLForConditionalGeneration", "qwen2_vl", "Qwen2-VL's, with Qwen2.5-VL's window-attention "
              "tower from transformers", f"{QWEN2_VL_TEST}[qwen2_5_vl-16]"),
    ModelInfo("BartForConditionalGeneration", "bart", "encoder-decoder: bidirectional encoder run once per request, "
              "cross-attention K/V in the paged cache, learned positions (offset 2), post-LayerNorm, tied head with "
              "final_logits_bias", BART_TEST),
    _fam("GemmaForCausalLM", "gemma", "(1 + w) RMSNorm, scaled embeddings, tanh-GELU gated MLP"),
    _fam("Gemma2ForCausalLM", "gemma2", "attention and final logit soft-capping, alternating sliding window, "
         "sandwich norms, query_pre_attn_scalar"),
    _fam("Gemma3ForCausalLM", "gemma3", "Gemma 2's plus per-head q/k norm and local/global RoPE bases"),
    _fam("Phi3ForCausalLM", "phi3", "fused qkv / gate_up in the checkpoint, LongRoPE, partial rotary (Phi-4)"),
    _fam("PhiForCausalLM", "phi", "parallel residual, partial rotary, LayerNorm, LM-head bias"),
    _fam("GPT2LMHeadModel", "gpt2", "learned positions, Conv1D weights, LayerNorm, GELU"),
    _fam("GPTJForCausalLM", "gptj", "parallel residual, interleaved (GPT-J style) partial rotary, LM-head bias"),
    _fam("GPTNeoXForCausalLM", "gpt_neox", "parallel residual with two norms, partial rotary, per-head fused qkv"),
    _fam("OPTForCausalLM", "opt", "learned positions with offset 2, ReLU"),
    _fam("BloomForCausalLM", "bloom", "ALiBi, embedding LayerNorm, per-head fused qkv"),
    _fam("FalconForCausalLM", "falcon", "new decoder architecture (grouped KV, two norms), multi-query, ALiBi",
         "falcon_new"),
    _fam("MptForCausalLM", "mpt", "ALiBi, q/k/v clipping, bias-free LayerNorm"),
    _fam("Starcoder2ForCausalLM", "starcoder2", "sliding window, LayerNorm, biases, plain GELU MLP"),
    _fam("StableLmForCausalLM", "stablelm", "partial rotary, LayerNorm, q/k/v bias, optional parallel residual"),
    _fam("OlmoForCausalLM", "olmo", "parameter-free LayerNorm, q/k/v clipping"),
    _fam("Olmo2ForCausalLM", "olmo2", "post-norms, full-width q/k RMSNorm"),
    _fam("GraniteForCausalLM", "granite", "embedding, residual, attention and logit multipliers"),
    _fam("CohereForCausalLM", "cohere", "parallel residual, interleaved rotary, logit scale"),
    _fam("InternLM2ForCausalLM", "internlm2", "fused wqkv grouped per KV head, renamed Llama layout "
         "(tok_embeddings, w1/w3/w2, output), optional wqkv/wo bias; runs without remote code"),
    _fam("Glm4ForCausalLM", "glm4", "sandwich norms, interleaved partial rotary, fused gate_up"),
    _fam("MixtralForCausalLM", "mixtral", "sparse MoE (fused_moe op), top-k renormalised routing"),
    _fam("Qwen2MoeForCausalLM", "qwen2_moe", "sparse MoE with a gated shared expert, dense layers"),
    _fam("Qwen3MoeForCausalLM", "qwen3_moe", "sparse MoE, per-head q/k RMSNorm"),
    _fam("GraniteMoeForCausalLM", "granitemoe", "sparse MoE with stacked expert weights, Granite multipliers"),
    _fam("DbrxForCausalLM", "dbrx", "fine-grained MoE with DBRX's stacked expert layout, q/k/v clipping, "
         "bias-free LayerNorm"),
    _fam("DeepseekV2ForCausalLM", "deepseek_v2", "MLA with a compressed latent KV cache (weight absorption), "
         "q LoRA, MoE with shared experts and group-limited routing, dense first layers"),
    _fam("DeepseekV3ForCausalLM", "deepseek_v3", "MLA as V2, sigmoid routing with score-correction bias over "
         "expert groups (noaux_tc)"),
)


@cache
def decoder_class(family: str) -> type:
    """One ``DecoderForCausalLM`` subclass per family (its name shows in logs and errors)."""
    from llmctl.models.decoder import DecoderForCausalLM

    return type(f"{family.title().replace('_', '')}Decoder", (DecoderForCausalLM,), {"family": family})


def native_architectures() -> list[ModelArchitecture]:
    return [ModelArchitecture(m.architecture, m.model_cls) for m in MODELS]


def attention_features(model_cls: Any, hf_config: Any) -> frozenset[str]:
    """The attention features (``llmctl.plugins.types.MODEL_ATTENTION_FEATURES``) a model built from
    ``hf_config`` needs, known before the model is built, so the attention backend can be chosen first."""
    found = getattr(model_cls, "attention_features", None)
    if callable(found):  # decoders derive theirs from the config (soft-cap, ALiBi, windows)
        return frozenset(found(hf_config))
    return frozenset(found or ())  # encoders declare a fixed set (bidirectional)


def render_markdown() -> str:
    lines = [
        "# Supported models",
        "",
        "<!-- Generated by `python -m llmctl.models.supported > docs/models.md`; a test fails when it is stale. -->",
        "",
        "Native architectures run on llmctl's own layers: paged attention, prefix caching and the platform's",
        "kernels. Each is compared with transformers by the named test (a tiny random checkpoint with its quirks",
        "switched on; fp32 greedy tokens identical, top-5 logprobs within 1e-3). Any other causal LM that",
        "transformers can build runs through the transformers fallback (`--model-impl transformers`, chosen",
        "automatically under `auto`), with llmctl's paged attention plugged into transformers' attention interface.",
        "",
        "| Architecture | Family | Features | Test |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{m.architecture}` | {m.family} | {m.features} | `{m.test}` |" for m in MODELS]
    lines += [
        "",
        "## Encoder-decoder models",
        "",
        "`BartForConditionalGeneration` generates through `LLM.generate` and `/v1/completions`: the prompt is the",
        "encoder's input, and the output is what the decoder generates from `decoder_start_token_id`. The encoder",
        "runs once per request (again after a preemption) and writes every decoder layer's cross-attention keys and",
        "values into the request's first KV blocks; the decoder's own keys and values follow them. `max_model_len`",
        "is the encoder's positions (padded to a KV block) plus one plus the decoder's, so the longest encoder input",
        "and the most decoder tokens fit together. Limits, each refused with an error naming the field: an encoder",
        "input over `max_position_embeddings`, `max_tokens` over the decoder's `max_position_embeddings`,",
        "`prompt_logprobs` (and `echo` with `logprobs`), beam search, `speculative_config`, `enable_lora`, and",
        "`max_num_batched_tokens` below the longest padded encoder input (an encoder runs in one step). Decode",
        "graphs are off for these models. The prefix cache shares encoder blocks only between equal encoder inputs.",
        "T5 is not supported: its relative position bias does not fit the paged attention backends.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
