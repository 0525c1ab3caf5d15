"""Builds tiny random-weight Hugging Face checkpoints for tests (safetensors + the SmolLM2 tokenizer).

``initializer_range=0.3`` keeps the random models from emitting one token forever, so greedy equality with
transformers actually compares something.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Shared with the benchmarks, which must not import tests/: the packaged SmolLM2 GGUF and its tokenizer.
from llmctl_testkit.smollm2 import SMOLLM2_FILE, load_test_tokenizer, smollm2_gguf_path  # noqa: E402

__all__ = ["SMOLLM2_FILE", "load_test_tokenizer", "make_tiny_model", "smollm2_gguf_path"]


def _common(tok) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )


def make_tiny_model(kind: str, out: Path, tok, **overrides) -> Path:
    import transformers as tf

    torch.manual_seed({"llama": 1, "mistral": 2, "qwen2": 3, "qwen3": 4}.get(kind, 5))
    cfg_kw = _common(tok)
    if kind == "llama":
        cfg_cls, model_cls = tf.LlamaConfig, tf.LlamaForCausalLM
        cfg_kw.update(tie_word_embeddings=False)
    elif kind == "llama_tied":
        cfg_cls, model_cls = tf.LlamaConfig, tf.LlamaForCausalLM
        cfg_kw.update(tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif kind == "mistral":
        cfg_cls, model_cls = tf.MistralConfig, tf.MistralForCausalLM
        cfg_kw.update(sliding_window=16, head_dim=16)
    elif kind == "qwen2":
        cfg_cls, model_cls = tf.Qwen2Config, tf.Qwen2ForCausalLM
        cfg_kw.update(tie_word_embeddings=True, use_sliding_window=False)
    elif kind == "qwen3":
        cfg_cls, model_cls = tf.Qwen3Config, tf.Qwen3ForCausalLM
        cfg_kw.update(head_dim=32, tie_word_embeddings=False, use_sliding_window=False)
    else:
        raise ValueError(kind)
    cfg_kw.update(overrides)
    config = cfg_cls(**cfg_kw)
    model = model_cls(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
