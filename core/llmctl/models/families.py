"""Each family's Hugging Face config read into a :class:`DecoderSpec`, with its checkpoint's names and layouts.

One function per family; what a family shares with Llama comes from :func:`_base`. A quirk the generic decoder
cannot run (e.g. StableLM's per-head q/k LayerNorm) raises ``ValueError`` naming the config field, so the
engine falls back to the transformers implementation instead of running a wrong model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from llmctl.models.decoder import PLAIN_OUT, DecoderSpec, MoESpec, OutLayout, Transform
from llmctl.models.llama import layer_sliding_windows


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _unsupported(cfg: Any, field: str, why: str) -> None:
    raise ValueError(f"{cfg.model_type}: {field}={getattr(cfg, field, None)!r} is not supported natively ({why})")


def _partial(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor") or _get(cfg, "partial_rotary_factor", default=1.0))


def _base(cfg: Any, **kw: Any) -> DecoderSpec:
    heads = cfg.num_attention_heads
    head_dim = _get(cfg, "head_dim", default=None) or cfg.hidden_size // heads
    n = cfg.num_hidden_layers
    rotary_dim = int(head_dim * _partial(cfg))
    base = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=n, num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", default=heads), head_dim=head_dim,
        intermediate_size=_get(cfg, "intermediate_size", default=4 * cfg.hidden_size),
        norm_eps=_get(cfg, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", default=1e-6),
        act=_get(cfg, "hidden_act", "hidden_activation", "activation_function", default="silu"),
        qkv_bias=bool(_get(cfg, "attention_bias", default=False)), o_bias=bool(_get(cfg, "attention_bias",
                                                                                      default=False)),
        mlp_bias=bool(_get(cfg, "mlp_bias", default=False)),
        rotary_dims=(rotary_dim,) * n, windows=tuple(layer_sliding_windows(cfg)),
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", default=False)),
    )
    base.update(kw)
    return DecoderSpec(**base)


# -- checkpoint transforms -----------------------------------------------------------------------------------


def _split_rows(marker: str, name: str, t: torch.Tensor, layout: OutLayout, sizes: list[int], head_dim: int,
                split: Callable[[torch.Tensor, int], list[torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """q, k and v of a fused tensor whose outputs run along ``layout.dim`` (rows of a plain weight, columns of a
    GPTQ ``qweight``, packed words of its ``qzeros``); ``split(x, head_entries)`` cuts ``x`` with the outputs
    first into q, k and v. A tensor stored once for the fused projection goes to the quantizer's ``whole``."""
    names = [name.replace(marker, f".{p}_proj.") for p in "qkv"]
    if layout.dim is None:
        return list(zip(names, layout.whole(t, sizes), strict=True))
    if head_dim % layout.pack:
        raise ValueError(f"weight {name}: head_dim={head_dim} is not a multiple of the {layout.pack} outputs one "
                         f"packed entry holds, so the fused q/k/v cannot be cut per head")
    parts = split(t.movedim(layout.dim, 0), head_dim // layout.pack)
    return [(n, p.movedim(0, layout.dim).contiguous()) for n, p in zip(names, parts, strict=True)]


def split_heads_qkv(marker: str, num_heads: int, head_dim: int) -> Transform:
    """A fused q/k/v tensor laid out head by head (``[heads, 3, head_dim]`` rows: GPT-NeoX, BLOOM) -> q, k, v."""

    def split(x: torch.Tensor, hd: int) -> list[torch.Tensor]:
        parts = x.reshape(num_heads, 3, hd, *x.shape[1:])
        return [parts[:, i].reshape(num_heads * hd, *x.shape[1:]) for i in range(3)]

    def transform(name: str, t: torch.Tensor, layout: OutLayout = PLAIN_OUT) -> list[tuple[str, torch.Tensor]]:
        if marker not in name:
            return [(name, t)]
        return _split_rows(marker, name, t, layout, [num_heads * head_dim] * 3, head_dim, split)

    return transform


def split_grouped_qkv(marker: str, num_heads: int, num_kv_heads: int, head_dim: int) -> Transform:
    """Falcon's new decoder and InternLM2's ``wqkv`` layout: per KV group, its query heads then one key and one
    value head."""
    group = num_heads // num_kv_heads

    def split(x: torch.Tensor, hd: int) -> list[torch.Tensor]:
        parts = x.reshape(num_kv_heads, group + 2, hd, *x.shape[1:])
        return [parts[:, :group].reshape(num_heads * hd, *x.shape[1:]),
                parts[:, group].reshape(num_kv_heads * hd, *x.shape[1:]),
                parts[:, group + 1].reshape(num_kv_heads * hd, *x.shape[1:])]

    def transform(name: str, t: torch.Tensor, layout: OutLayout = PLAIN_OUT) -> list[tuple[str, torch.Tensor]]:
        if marker not in name:
            return [(name, t)]
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        return _split_rows(marker, name, t, layout, sizes, head_dim, split)

    return transform


def transpose_conv1d(*markers: str) -> Transform:
    """GPT-2 stores its projections as ``Conv1D`` weights, ``[in, out]`` (a quantized format's tensors carry
    their own layout and are left as they are)."""

    def transform(name: str, t: torch.Tensor, layout: OutLayout = PLAIN_OUT) -> list[tuple[str, torch.Tensor]]:
        if name.endswith(".weight") and t.dim() == 2 and any(m in name for m in markers):
            return [(name, t.t().contiguous())]
        return [(name, t)]

    return transform


# -- families ------------------------------------------------------------------------------------------------


def gemma(cfg: Any) -> DecoderSpec:
    return _base(cfg, norm_offset=1.0, embed_scale=math.sqrt(cfg.hidden_size), tie_word_embeddings=True,
                 act=_get(cfg, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh"))


def gemma2(cfg: Any) -> DecoderSpec:
    return replace(gemma(cfg), layout="sandwich", scale=float(cfg.query_pre_attn_scalar) ** -0.5,
                   attn_soft_cap=_get(cfg, "attn_logit_softcapping"),
                   final_soft_cap=_get(cfg, "final_logit_softcapping"))


def gemma3(cfg: Any) -> DecoderSpec:
    types = tuple(getattr(cfg, "layer_types", None) or ())
    nested = isinstance(getattr(cfg, "rope_parameters", None), dict) and \
        all(isinstance(v, dict) for v in cfg.rope_parameters.values())
    return replace(gemma2(cfg), qk_norm="head", layer_rope_types=types if nested else ())


def phi3(cfg: Any) -> DecoderSpec:
    # The checkpoint already fuses qkv_proj and gate_up_proj; the loader splits them into the shards.
    return _base(cfg)


def phi(cfg: Any) -> DecoderSpec:
    if getattr(cfg, "qk_layernorm", False):
        _unsupported(cfg, "qk_layernorm", "per-head LayerNorm of q/k")
    return _base(cfg, norm="layer", norm_bias=True, layout="parallel", qkv_bias=True, o_bias=True, mlp="plain",
                 mlp_bias=True, lm_head_bias=True,
                 renames=((r"\.final_layernorm\.", ".norm."), (r"\.self_attn\.dense\.", ".self_attn.o_proj."),
                          (r"\.mlp\.fc", ".mlp.fc")))


def gpt2(cfg: Any) -> DecoderSpec:
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
        _unsupported(cfg, "scale_attn_by_inverse_layer_idx", "per-layer attention scaling")
    n = cfg.n_layer
    return _base(cfg, norm="layer", norm_bias=True, qkv_bias=True, o_bias=True, mlp="plain", mlp_bias=True,
                 intermediate_size=cfg.n_inner or 4 * cfg.n_embd, rotary_dims=(0,) * n,
                 learned_positions=cfg.n_positions,
                 tie_word_embeddings=True, act=cfg.activation_function,
                 renames=((r"^(transformer\.)?", "model."), (r"^model\.wte\.", "model.embed_tokens."),
                          (r"^model\.wpe\.", "model.embed_positions."), (r"^model\.h\.", "model.layers."),
                          (r"\.ln_1\.", ".input_layernorm."), (r"\.ln_2\.", ".post_attention_layernorm."),
                          (r"\.attn\.c_attn\.", ".self_attn.qkv_proj."), (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
                          (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2."),
                          (r"^model\.ln_f\.", "model.norm."), (r"^model\.lm_head\.", "lm_head.")),
                 transforms=(transpose_conv1d(".qkv_proj.", ".o_proj.", ".fc1.", ".fc2."),),
                 skipped=(r"\.attn\.bias$", r"\.attn\.masked_bias$"))


def gptj(cfg: Any) -> DecoderSpec:
    head_dim = cfg.n_embd // cfg.n_head
    return _base(cfg, norm="layer", norm_bias=True, layout="parallel", mlp="plain", mlp_bias=True,
                 intermediate_size=cfg.n_inner or 4 * cfg.n_embd, act=cfg.activation_function,
                 rotary_dims=(cfg.rotary_dim or head_dim,) * cfg.n_layer, rope_neox_style=False, lm_head_bias=True,
                 renames=((r"^transformer\.", "model."), (r"^model\.wte\.", "model.embed_tokens."),
                          (r"^model\.h\.", "model.layers."), (r"\.ln_1\.", ".input_layernorm."),
                          (r"\.attn\.out_proj\.", ".self_attn.o_proj."), (r"\.attn\.", ".self_attn."),
                          (r"\.mlp\.fc_in\.", ".mlp.fc1."), (r"\.mlp\.fc_out\.", ".mlp.fc2."),
                          (r"^model\.ln_f\.", "model.norm.")),
                 skipped=(r"\.attn\.bias$", r"\.attn\.masked_bias$"))


def gpt_neox(cfg: Any) -> DecoderSpec:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    bias = bool(getattr(cfg, "attention_bias", True))
    return _base(cfg, norm="layer", norm_bias=True, layout="parallel2" if cfg.use_parallel_residual else "pre",
                 qkv_bias=bias, o_bias=bias, mlp="plain", mlp_bias=True, act=cfg.hidden_act,
                 renames=((r"^gpt_neox\.", "model."), (r"^model\.embed_in\.", "model.embed_tokens."),
                          (r"\.attention\.query_key_value\.", ".self_attn.qkv_heads."),
                          (r"\.attention\.dense\.", ".self_attn.o_proj."),
                          (r"\.mlp\.dense_h_to_4h\.", ".mlp.fc1."), (r"\.mlp\.dense_4h_to_h\.", ".mlp.fc2."),
                          (r"^model\.final_layer_norm\.", "model.norm."), (r"^embed_out\.", "lm_head.")),
                 transforms=(split_heads_qkv(".qkv_heads.", cfg.num_attention_heads, head_dim),),
                 skipped=(r"\.attention\.bias$", r"\.attention\.masked_bias$"))


def opt(cfg: Any) -> DecoderSpec:
    if not cfg.do_layer_norm_before:
        _unsupported(cfg, "do_layer_norm_before", "post-norm OPT-350m")
    if cfg.word_embed_proj_dim != cfg.hidden_size:
        _unsupported(cfg, "word_embed_proj_dim", "projected embeddings")
    bias = bool(cfg.enable_bias)
    return _base(cfg, norm="layer", norm_bias=True, qkv_bias=bias, o_bias=bias, mlp="plain", mlp_bias=bias,
                 intermediate_size=cfg.ffn_dim, act=cfg.activation_function, norm_eps=1e-5,
                 rotary_dims=(0,) * cfg.num_hidden_layers, learned_positions=cfg.max_position_embeddings + 2,
                 position_offset=2, tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
                 renames=((r"^model\.decoder\.", "model."), (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
                          (r"\.self_attn_layer_norm\.", ".input_layernorm."),
                          (r"(layers\.\d+)\.final_layer_norm\.", r"\1.post_attention_layernorm."),
                          (r"(layers\.\d+)\.fc", r"\1.mlp.fc"), (r"^model\.final_layer_norm\.", "model.norm.")))


def bloom(cfg: Any) -> DecoderSpec:
    if cfg.apply_residual_connection_post_layernorm:
        _unsupported(cfg, "apply_residual_connection_post_layernorm", "post-norm residuals")
    head_dim = cfg.hidden_size // cfg.n_head
    return _base(cfg, norm="layer", norm_bias=True, qkv_bias=True, o_bias=True, mlp="plain", mlp_bias=True,
                 intermediate_size=4 * cfg.hidden_size, act="gelu_pytorch_tanh", alibi=True, embed_norm=True,
                 rotary_dims=(0,) * cfg.n_layer, tie_word_embeddings=True,
                 renames=((r"^(transformer\.)?", "model."), (r"^model\.word_embeddings\.", "model.embed_tokens."),
                          (r"^model\.word_embeddings_layernorm\.", "model.embed_norm."),
                          (r"^model\.h\.", "model.layers."),
                          (r"\.self_attention\.query_key_value\.", ".self_attn.qkv_heads."),
                          (r"\.self_attention\.dense\.", ".self_attn.o_proj."),
                          (r"\.mlp\.dense_h_to_4h\.", ".mlp.fc1."), (r"\.mlp\.dense_4h_to_h\.", ".mlp.fc2."),
                          (r"^model\.ln_f\.", "model.norm."), (r"^model\.lm_head\.", "lm_head.")),
                 transforms=(split_heads_qkv(".qkv_heads.", cfg.n_head, head_dim),))


def falcon(cfg: Any) -> DecoderSpec:
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    new_arch = bool(cfg.new_decoder_architecture)
    kv = cfg.num_kv_heads if new_arch else (1 if cfg.multi_query else heads)
    if new_arch:
        layout = "parallel2" if getattr(cfg, "num_ln_in_parallel_attn", 2) == 2 else "parallel"
    else:
        layout = "parallel" if cfg.parallel_attn else "pre"
    renames = [(r"^transformer\.", "model."), (r"^model\.word_embeddings\.", "model.embed_tokens."),
               (r"^model\.h\.", "model.layers."), (r"\.self_attention\.dense\.", ".self_attn.o_proj."),
               (r"\.self_attention\.query_key_value\.", ".self_attn.qkv_fused."),
               (r"\.mlp\.dense_h_to_4h\.", ".mlp.fc1."), (r"\.mlp\.dense_4h_to_h\.", ".mlp.fc2."),
               (r"^model\.ln_f\.", "model.norm.")]
    if layout == "parallel2":
        renames += [(r"\.ln_attn\.", ".input_layernorm."), (r"\.ln_mlp\.", ".post_attention_layernorm.")]
    elif layout == "parallel":
        renames += [(r"\.ln_attn\.", ".input_layernorm.")]
    if new_arch:
        qkv = split_grouped_qkv(".qkv_fused.", heads, kv, head_dim)
    elif cfg.multi_query:
        def qkv(name: str, t: torch.Tensor, layout: OutLayout = PLAIN_OUT) -> list[tuple[str, torch.Tensor]]:
            return [(name.replace(".qkv_fused.", ".qkv_proj."), t)]
    else:
        qkv = split_heads_qkv(".qkv_fused.", heads, head_dim)
    scale = head_dim ** -0.5
    # Falcon adds the ALiBi bias before scaling the scores, i.e. the slopes are scaled too.
    extra = {"alibi_scale": scale} if cfg.alibi else {}
    return _base(cfg, norm="layer", norm_bias=True, layout=layout, num_kv_heads=kv, qkv_bias=cfg.bias,
                 o_bias=cfg.bias, mlp="plain", mlp_bias=cfg.bias, act=getattr(cfg, "activation", "gelu"),
                 intermediate_size=getattr(cfg, "ffn_hidden_size", None) or 4 * cfg.hidden_size,
                 rotary_dims=(0 if cfg.alibi else head_dim,) * cfg.num_hidden_layers, alibi=cfg.alibi,
                 tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)), renames=tuple(renames),
                 transforms=(qkv,), extra=extra)


def mpt(cfg: Any) -> DecoderSpec:
    attn = cfg.attn_config
    get = (lambda k, d=None: attn.get(k, d)) if isinstance(attn, dict) else (lambda k, d=None: getattr(attn, k, d))
    if get("qk_ln"):
        _unsupported(cfg, "attn_config.qk_ln", "q/k LayerNorm")
    if not get("alibi") or get("alibi_bias_max", 8) != 8 or cfg.n_heads & (cfg.n_heads - 1):
        _unsupported(cfg, "attn_config.alibi", "MPT is run with ALiBi (bias max 8, a power-of-two head count)")
    # As transformers builds it: bias-free norms and a 4x MLP whatever expansion_ratio says.
    return _base(cfg, norm="layer", norm_bias=False, qkv_bias=not cfg.no_bias, o_bias=not cfg.no_bias,
                 mlp="plain", mlp_bias=not cfg.no_bias, intermediate_size=4 * cfg.d_model,
                 act="gelu", alibi=True, rotary_dims=(0,) * cfg.n_layers, tie_word_embeddings=True,
                 norm_eps=cfg.layer_norm_epsilon, clip_qkv=get("clip_qkv"),
                 scale=get("softmax_scale") or 0.0,
                 renames=((r"^transformer\.", "model."), (r"^model\.wte\.", "model.embed_tokens."),
                          (r"^model\.blocks\.", "model.layers."), (r"\.norm_1\.", ".input_layernorm."),
                          (r"\.norm_2\.", ".post_attention_layernorm."), (r"\.attn\.Wqkv\.", ".self_attn.qkv_proj."),
                          (r"\.attn\.out_proj\.", ".self_attn.o_proj."), (r"\.ffn\.up_proj\.", ".mlp.fc1."),
                          (r"\.ffn\.down_proj\.", ".mlp.fc2."), (r"^model\.norm_f\.", "model.norm.")))


def starcoder2(cfg: Any) -> DecoderSpec:
    bias = bool(cfg.use_bias)
    return _base(cfg, norm="layer", norm_bias=True, qkv_bias=bias, o_bias=bias, mlp="plain", mlp_bias=bias,
                 norm_eps=cfg.norm_epsilon, tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
                 renames=((r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2.")))


def stablelm(cfg: Any) -> DecoderSpec:
    if cfg.qk_layernorm:
        _unsupported(cfg, "qk_layernorm", "per-head LayerNorm of q/k")
    return _base(cfg, norm="layer", norm_bias=True, qkv_bias=bool(cfg.use_qkv_bias), o_bias=False,
                 layout="parallel" if cfg.use_parallel_residual else "pre")


def olmo(cfg: Any) -> DecoderSpec:
    return _base(cfg, norm="layer_noparam", norm_eps=1e-5, clip_qkv=cfg.clip_qkv)


def olmo2(cfg: Any) -> DecoderSpec:
    return _base(cfg, layout="post", qk_norm="full")


def granite(cfg: Any) -> DecoderSpec:
    return _base(cfg, embed_scale=float(cfg.embedding_multiplier), residual_multiplier=float(cfg.residual_multiplier),
                 scale=float(cfg.attention_multiplier), logits_scale=1.0 / float(cfg.logits_scaling))


def cohere(cfg: Any) -> DecoderSpec:
    if getattr(cfg, "use_qk_norm", False):
        _unsupported(cfg, "use_qk_norm", "per-head LayerNorm of q/k")
    return _base(cfg, norm="layer", norm_bias=False, norm_eps=cfg.layer_norm_eps, layout="parallel",
                 rope_neox_style=False, logits_scale=float(cfg.logit_scale), tie_word_embeddings=True)


def glm4(cfg: Any) -> DecoderSpec:
    return _base(cfg, layout="sandwich", rope_neox_style=False, o_bias=False,
                 renames=((r"\.post_attention_layernorm\.", ".pre_feedforward_layernorm."),
                          (r"\.post_self_attn_layernorm\.", ".post_attention_layernorm."),
                          (r"\.post_mlp_layernorm\.", ".post_feedforward_layernorm.")))


def internlm2(cfg: Any) -> DecoderSpec:
    """InternLM2 is Llama with its own names and one fused ``wqkv`` grouped per KV head (the query heads of a
    group, then its key head, then its value head); ``bias`` covers wqkv and wo. Its config class is remote code,
    so ``cfg`` is the plain config of config.json (``tie_word_embeddings`` absent means untied, as InternLM2's
    own class defaults)."""
    heads = cfg.num_attention_heads
    kv = _get(cfg, "num_key_value_heads", default=heads)
    if heads % kv:
        _unsupported(cfg, "num_key_value_heads", f"must divide num_attention_heads={heads}")
    head_dim = cfg.hidden_size // heads
    bias = bool(_get(cfg, "bias", default=False))
    return _base(cfg, num_kv_heads=kv, head_dim=head_dim, qkv_bias=bias, o_bias=bias, mlp_bias=False,
                 renames=((r"^model\.tok_embeddings\.", "model.embed_tokens."),
                          (r"\.attention\.wqkv\.", ".self_attn.wqkv_grouped."),
                          (r"\.attention\.wo\.", ".self_attn.o_proj."),
                          (r"\.feed_forward\.w1\.", ".mlp.gate_proj."), (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
                          (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
                          (r"\.attention_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
                          (r"^output\.", "lm_head.")),
                 transforms=(split_grouped_qkv(".wqkv_grouped.", heads, kv, head_dim),))


# -- mixtures of experts -------------------------------------------------------------------------------------


def mixtral(cfg: Any) -> DecoderSpec:
    moe = MoESpec(cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size)
    return _base(cfg, moe=moe,
                 renames=((r"\.block_sparse_moe\.gate\.", ".mlp.gate."),
                          (r"\.block_sparse_moe\.experts\.(\d+)\.w1\.", r".mlp.experts.\1.gate_proj."),
                          (r"\.block_sparse_moe\.experts\.(\d+)\.w3\.", r".mlp.experts.\1.up_proj."),
                          (r"\.block_sparse_moe\.experts\.(\d+)\.w2\.", r".mlp.experts.\1.down_proj.")))


def _qwen_moe(cfg: Any, **kw: Any) -> MoESpec:
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    dense = set(getattr(cfg, "mlp_only_layers", None) or [])
    dense |= {i for i in range(cfg.num_hidden_layers) if cfg.num_experts <= 0 or (i + 1) % step != 0}
    return MoESpec(cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                   renormalize=bool(cfg.norm_topk_prob), dense_layers=frozenset(dense),
                   dense_intermediate_size=cfg.intermediate_size, **kw)


def qwen2_moe(cfg: Any) -> DecoderSpec:
    shared = int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0)
    return _base(cfg, qkv_bias=True, o_bias=False,
                 moe=_qwen_moe(cfg, shared_intermediate_size=shared, shared_expert_gate=shared > 0))


def qwen3_moe(cfg: Any) -> DecoderSpec:
    return _base(cfg, qk_norm="head", moe=_qwen_moe(cfg))


def granitemoe(cfg: Any) -> DecoderSpec:
    moe = MoESpec(cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size)
    return replace(granite(cfg), moe=moe,
                   renames=((r"\.block_sparse_moe\.router\.layer\.", ".mlp.gate."),
                            (r"\.block_sparse_moe\.input_linear\.", ".mlp.experts.stacked_w13."),
                            (r"\.block_sparse_moe\.output_linear\.", ".mlp.experts.stacked_w2.")))


def dbrx(cfg: Any) -> DecoderSpec:
    attn, ffn = cfg.attn_config, cfg.ffn_config
    if getattr(ffn, "moe_normalize_expert_weights", 1.0) not in (None, 1, 1.0):
        _unsupported(cfg, "ffn_config.moe_normalize_expert_weights", "only L1 renormalisation (1) or none")
    moe = MoESpec(ffn.moe_num_experts, ffn.moe_top_k, ffn.ffn_hidden_size,
                  renormalize=getattr(ffn, "moe_normalize_expert_weights", 1.0) is not None)
    n = cfg.n_layers
    return _base(cfg, num_kv_heads=attn.kv_n_heads, norm="layer", norm_bias=False, norm_eps=1e-5,
                 clip_qkv=attn.clip_qkv, act=(getattr(ffn, "ffn_act_fn", None) or {}).get("name", "silu"), moe=moe,
                 rotary_dims=(cfg.d_model // cfg.n_heads,) * n,
                 renames=((r"^transformer\.", "model."), (r"^model\.wte\.", "model.embed_tokens."),
                          (r"^model\.blocks\.", "model.layers."), (r"^model\.norm_f\.", "model.norm."),
                          (r"\.norm_attn_norm\.norm_1\.", ".input_layernorm."),
                          (r"\.norm_attn_norm\.norm_2\.", ".post_attention_layernorm."),
                          (r"\.norm_attn_norm\.attn\.Wqkv\.", ".self_attn.qkv_proj."),
                          (r"\.norm_attn_norm\.attn\.out_proj\.", ".self_attn.o_proj."),
                          (r"\.ffn\.router\.layer\.", ".mlp.gate."),
                          (r"\.ffn\.experts\.mlp\.(w1|v1|w2)$", r".mlp.experts.dbrx_\1")))


def deepseek(cfg: Any) -> DecoderSpec:
    """DeepSeek-V2 and V3: MLA attention (see llmctl.models.mla) and a MoE with shared experts and grouped
    routing; the first ``first_k_dense_replace`` layers keep a dense MLP."""
    from llmctl.models.mla import MLASpec

    if getattr(cfg, "moe_layer_freq", 1) not in (None, 1):
        _unsupported(cfg, "moe_layer_freq", "MoE on every layer past first_k_dense_replace only")
    mla = MLASpec(cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    from transformers.modeling_rope_utils import yarn_apply_mscale

    scale = yarn_apply_mscale(getattr(cfg, "rope_parameters", None) or {}, scale)  # YaRN scales the scores too
    v3 = cfg.model_type == "deepseek_v3"
    experts = cfg.n_routed_experts
    method = "noaux_tc" if v3 else cfg.topk_method
    moe = MoESpec(experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                  renormalize=bool(v3 and cfg.norm_topk_prob),
                  shared_intermediate_size=cfg.moe_intermediate_size * (cfg.n_shared_experts or 0),
                  dense_layers=frozenset(range(cfg.first_k_dense_replace)),
                  dense_intermediate_size=cfg.intermediate_size, scoring="sigmoid" if v3 else "softmax",
                  topk_method=method, num_groups=cfg.n_group or 1, topk_groups=cfg.topk_group or 1,
                  routed_scaling_factor=float(cfg.routed_scaling_factor))
    return _base(cfg, num_kv_heads=1, head_dim=mla.cache_head_size, mla=mla, scale=scale, moe=moe,
                 rotary_dims=(cfg.qk_rope_head_dim,) * cfg.num_hidden_layers, rope_neox_style=False,
                 renames=((r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),
                          (r"\.mlp\.gate\.e_score_correction_bias$", ".mlp.e_score_correction_bias")))


FAMILIES: dict[str, Callable[[Any], DecoderSpec]] = {
    "gemma": gemma, "gemma2": gemma2, "gemma3": gemma3, "phi3": phi3, "phi": phi, "gpt2": gpt2, "gptj": gptj,
    "gpt_neox": gpt_neox, "opt": opt, "bloom": bloom, "falcon": falcon, "mpt": mpt, "starcoder2": starcoder2,
    "stablelm": stablelm, "olmo": olmo, "olmo2": olmo2, "granite": granite, "cohere": cohere, "glm4": glm4,
    "internlm2": internlm2,
    "mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "granitemoe": granitemoe,
    "deepseek_v2": deepseek, "deepseek_v3": deepseek, "dbrx": dbrx,
}


def spec_for(family: str, hf_config: Any) -> DecoderSpec:
    cfg = getattr(hf_config, "text_config", None) or hf_config
    return FAMILIES[family](cfg)
