"""Tiny random checkpoints of every natively supported family, each with its quirks switched on.

``initializer_range=0.3`` (as in model_factory) keeps greedy decoding from repeating one token, so equality with
transformers compares something; windows of 8 tokens make the sliding-window layers bite on short prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _llama_like(tok, **kw: Any) -> dict[str, Any]:
    base = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3)
    base.update(kw)
    return base


def _ids(tok) -> dict[str, Any]:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad)


def family_config(kind: str, tok) -> tuple[str, str, dict[str, Any]]:
    """kind -> (transformers config class, model class, config kwargs)."""
    v = len(tok)
    ll = _llama_like
    rotary_12 = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    table: dict[str, tuple[str, str, dict[str, Any]]] = {
        "gemma": ("GemmaConfig", "GemmaForCausalLM", ll(tok, head_dim=16)),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
                   ll(tok, head_dim=16, sliding_window=8, attn_logit_softcapping=4.0, final_logit_softcapping=6.0,
                      query_pre_attn_scalar=24)),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                   # No attention soft-cap: Gemma 3 checkpoints have none, and transformers' SDPA path ignores it.
                   ll(tok, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                      final_logit_softcapping=6.0, query_pre_attn_scalar=24,
                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                       "full_attention": {"rope_type": "linear", "rope_theta": 10000.0,
                                                          "factor": 4.0}})),
        "phi3": ("Phi3Config", "Phi3ForCausalLM",
                 ll(tok, original_max_position_embeddings=64,
                    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                     "short_factor": rotary_12, "long_factor": [x * 2 for x in rotary_12]})),
        "phi": ("PhiConfig", "PhiForCausalLM",
                ll(tok, num_key_value_heads=4, partial_rotary_factor=0.5)),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel",
                 dict(vocab_size=v, n_embd=64, n_layer=2, n_head=4, n_positions=512, initializer_range=0.3)),
        "gptj": ("GPTJConfig", "GPTJForCausalLM",
                 dict(vocab_size=v, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512,
                      initializer_range=0.3)),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                     ll(tok, num_key_value_heads=None, partial_rotary_factor=0.25, use_parallel_residual=True)),
        "opt": ("OPTConfig", "OPTForCausalLM",
                dict(vocab_size=v, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                     word_embed_proj_dim=64, max_position_embeddings=512, init_std=0.3)),
        "bloom": ("BloomConfig", "BloomForCausalLM",
                  dict(vocab_size=v, hidden_size=64, n_layer=2, n_head=4, initializer_range=0.3)),
        "falcon_new": ("FalconConfig", "FalconForCausalLM",
                       dict(vocab_size=v, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                            new_decoder_architecture=True, bias=True, initializer_range=0.3,
                            max_position_embeddings=512)),
        "falcon_mq": ("FalconConfig", "FalconForCausalLM",
                      dict(vocab_size=v, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                           parallel_attn=True, new_decoder_architecture=False, initializer_range=0.3,
                           max_position_embeddings=512)),
        "falcon_alibi": ("FalconConfig", "FalconForCausalLM",
                         dict(vocab_size=v, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              multi_query=False, parallel_attn=False, alibi=True, bias=True,
                              new_decoder_architecture=False, initializer_range=0.3, max_position_embeddings=512)),
        "mpt": ("MptConfig", "MptForCausalLM",
                dict(vocab_size=v, d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=512,
                     initializer_range=0.3, attn_config={"alibi": True, "clip_qkv": 2.0})),
        "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", ll(tok, sliding_window=8, use_bias=True)),
        "stablelm": ("StableLmConfig", "StableLmForCausalLM",
                     ll(tok, partial_rotary_factor=0.25, use_qkv_bias=True)),
        "olmo": ("OlmoConfig", "OlmoForCausalLM", ll(tok, clip_qkv=2.0)),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", ll(tok)),
        "granite": ("GraniteConfig", "GraniteForCausalLM",
                    ll(tok, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                       logits_scaling=2.0)),
        "cohere": ("CohereConfig", "CohereForCausalLM", ll(tok, logit_scale=0.5)),
        "glm4": ("Glm4Config", "Glm4ForCausalLM", ll(tok, partial_rotary_factor=0.5, attention_bias=True)),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                    ll(tok, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                      ll(tok, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False)),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      ll(tok, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         norm_topk_prob=True)),
        "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                       ll(tok, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0,
                          residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0)),
        "dbrx": ("DbrxConfig", "DbrxForCausalLM",
                 dict(vocab_size=v, d_model=64, n_heads=4, n_layers=2, max_seq_len=512, initializer_range=0.3,
                      attn_config={"kv_n_heads": 2, "clip_qkv": 2.0, "rope_theta": 5000.0},
                      ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2})),
        "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                        ll(tok, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
                           qk_rope_head_dim=8, v_head_dim=12, head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=4,
                           topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=1.5)),
        "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                        ll(tok, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                           qk_rope_head_dim=8, v_head_dim=12, head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=4,
                           topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.0)),
    }
    cfg_name, model_name, kw = table[kind]
    kw = {k: val for k, val in kw.items() if val is not None or k == "q_lora_rank"}
    kw.update(_ids(tok))
    return cfg_name, model_name, kw


# InternLM2 has no transformers class (its code is remote), so its oracle is a Llama with the same weights written
# in InternLM2's layout: kind -> (LlamaConfig kwargs, InternLM2 config.json extras). Six query heads over two KV
# heads make each wqkv group three query heads, a key and a value, so a wrong de-interleave cannot pass.
INTERNLM2_KINDS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "internlm2": (dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2), {"rope_scaling": None}),
    "internlm2_bias": (dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6, attention_bias=True,
                            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}),
                       {"bias": True, "rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}),
}


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """q/k/v projections (weights or biases) -> InternLM2's wqkv: per KV group its query heads, its key, its value."""
    rest = q.shape[1:]
    qg = q.reshape(num_kv_heads, -1, head_dim, *rest)
    kg = k.reshape(num_kv_heads, 1, head_dim, *rest)
    vg = v.reshape(num_kv_heads, 1, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def llama_to_internlm2(state: dict[str, torch.Tensor], num_kv_heads: int, head_dim: int,
                       pack=pack_wqkv) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM state dict in InternLM2's checkpoint names (``pack`` builds wqkv)."""
    out: dict[str, torch.Tensor] = {}
    names = {"self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
             "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    for name, t in state.items():
        if name == "model.embed_tokens.weight":
            out["model.tok_embeddings.weight"] = t
        elif name == "lm_head.weight":
            out["output.weight"] = t
        elif name == "model.norm.weight":
            out[name] = t
        elif ".self_attn.q_proj." in name:
            kind = name.rsplit(".", 1)[1]
            k = state[name.replace("q_proj", "k_proj")]
            v = state[name.replace("q_proj", "v_proj")]
            out[name.replace("self_attn.q_proj", "attention.wqkv")] = pack(t, k, v, num_kv_heads, head_dim)
            assert kind in ("weight", "bias")
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        else:
            for src, dst in names.items():
                if f".{src}." in name:
                    out[name.replace(src, dst)] = t
                    break
            else:
                raise AssertionError(f"unmapped Llama tensor {name}")
    return {n: t.contiguous() for n, t in out.items()}


def make_internlm2_model(kind: str, out: Path, tok, seed: int = 0, pack=pack_wqkv) -> tuple[Path, Any]:
    """An InternLM2 checkpoint (config.json with the remote-code auto_map real ones carry) and the Llama it was
    converted from, which is the reference."""
    import json

    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_kw, extra = INTERNLM2_KINDS[kind]
    kw = _llama_like(tok, **llama_kw)
    kw.update(_ids(tok))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    heads, kv = kw["num_attention_heads"], kw["num_key_value_heads"]
    head_dim = kw["hidden_size"] // heads
    out.mkdir(parents=True, exist_ok=True)
    save_file(llama_to_internlm2(dict(model.state_dict()), kv, head_dim, pack), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = dict(model_type="internlm2", architectures=["InternLM2ForCausalLM"],
                  auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
                  vocab_size=kw["vocab_size"], hidden_size=kw["hidden_size"],
                  intermediate_size=kw["intermediate_size"], num_hidden_layers=kw["num_hidden_layers"],
                  num_attention_heads=heads, num_key_value_heads=kv, hidden_act="silu",
                  max_position_embeddings=kw["max_position_embeddings"], rms_norm_eps=model.config.rms_norm_eps,
                  rope_theta=10000.0, bias=False, tie_word_embeddings=False, torch_dtype="float32",
                  **{k: kw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    config.update(extra)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(out)
    return out, model


def make_family_model(kind: str, out: Path, tok, seed: int = 0) -> tuple[Path, Any]:
    """The checkpoint directory and the transformers model it was saved from (float32, eval mode)."""
    import transformers as tf

    if kind in INTERNLM2_KINDS:
        return make_internlm2_model(kind, out, tok, seed)
    cfg_name, model_name, kw = family_config(kind, tok)
    torch.manual_seed(seed)
    config = getattr(tf, cfg_name)(**kw)
    model = getattr(tf, model_name)(config).eval()
    for module in model.modules():  # DeepSeek-V3's routing bias starts at zero: make it choose
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(torch.randn(bias.shape) * 0.3)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out, model
