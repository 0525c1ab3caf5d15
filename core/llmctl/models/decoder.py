"""One configurable decoder for the families that differ from Llama only in switches.

A family reads its Hugging Face config into a :class:`DecoderSpec` (``llmctl.models.families``): which norm
(RMS, LayerNorm, parameter-free LayerNorm, Gemma's ``1 + w``), where the norms sit (pre-norm, Gemma 2's
sandwich, OLMo 2's post-norm, GPT-J's and GPT-NeoX's parallel residual), how positions enter (rotary, partial or
interleaved, per-layer-type tables; learned; ALiBi), the MLP (gated or plain, any activation, or a mixture of
experts), and the attention features (soft-capping, per-layer sliding windows). Checkpoint names are mapped onto
this module's names by the family's renames and tensor transforms, so the model code never special-cases a
checkpoint layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.attention import AttentionMetadata
from llmctl.layers import Attention, MergedLinear, RMSNorm, VocabEmbedding
from llmctl.layers._module import EngineModule
from llmctl.layers._params import copy_checked, empty_param, materialize
from llmctl.layers.attention import alibi_slopes
from llmctl.layers.mlp import SILU_ACTS, GatedMLP
from llmctl.layers.parallel import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    load_stacked_tensor,
)
from llmctl.layers.rotary import RotaryEmbedding, rope_parameters
from llmctl.models.base import KVCacheSpec, ModelContext
from llmctl.models.pipeline import OtherStageLayer, on_stage, stage_logits
from llmctl.plugins.types import FEATURE_ALIBI, FEATURE_LOGITS_SOFT_CAP, FEATURE_SLIDING_WINDOW
from llmctl.tensor_parallel import SINGLE, TensorParallelGroup, kv_head_slice, split_evenly


@dataclass(frozen=True)
class OutLayout:
    """Where a checkpoint tensor's outputs run, for a transform that cuts a fused projection into its parts:
    ``dim`` (rows of a plain weight; a quantized format's ``QParam.out_dim``, ``pack`` outputs per entry), or
    None for a tensor stored once for the fused projection, which ``whole(tensor, part sizes)`` shares out."""

    dim: int | None = 0
    pack: int = 1
    whole: Callable[[torch.Tensor, list[int]], list[torch.Tensor]] = lambda t, sizes: [t] * len(sizes)


PLAIN_OUT = OutLayout()

# A checkpoint tensor transform: (canonical-ish name, tensor, its outputs' layout) -> the tensors to load instead.
Transform = Callable[..., list[tuple[str, torch.Tensor]]]


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool = True  # top-k weights renormalised to sum to 1 (Mixtral); Qwen2-MoE's norm_topk_prob
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE scales the shared expert by sigmoid(gate(x))
    dense_layers: frozenset[int] = frozenset()  # layers that keep a dense MLP (Qwen-MoE's mlp_only_layers)
    dense_intermediate_size: int = 0
    # DeepSeek routing: "softmax" or "sigmoid" scores; "greedy", "group_limited_greedy" (V2) or "noaux_tc" (V3, with
    # a per-expert score-correction bias) top-k; weights scaled by routed_scaling_factor.
    scoring: str = "softmax"
    topk_method: str = "greedy"
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0


@dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm: str = "rms"  # "rms" | "layer" | "layer_noparam" (OLMo: no weight or bias)
    norm_eps: float = 1e-6
    norm_bias: bool = False
    norm_offset: float = 0.0  # Gemma stores w and scales by 1 + w; added at load time
    # "pre": x += attn(n1(x)); x += mlp(n2(x)).  "sandwich" (Gemma 2/3, GLM-4): post-norms on both branch outputs
    # too.  "post" (OLMo 2): only post-norms.  "parallel": x += attn(n1(x)) + mlp(n1(x)) (GPT-J, Cohere, Phi).
    # "parallel2": x += attn(n1(x)) + mlp(n2(x)) (GPT-NeoX).
    layout: str = "pre"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp: str = "gated"  # "gated" (act(gate) * up) | "plain" (act(fc1))
    mlp_bias: bool = False
    act: str = "silu"
    qk_norm: str | None = None  # "head": per-head RMSNorm of q/k (Qwen3, Gemma 3); "full": over all heads (OLMo 2)
    rotary_dims: tuple[int, ...] = ()  # per layer; 0 where a layer has no rotary
    rope_neox_style: bool = True  # False: GPT-J's interleaved pairs
    layer_rope_types: tuple[str | None, ...] = ()  # per layer: key into a per-layer-type rope config (Gemma 3)
    learned_positions: int = 0  # size of a learned position table (GPT-2, OPT)
    position_offset: int = 0  # OPT's learned table starts at 2
    alibi: bool = False
    scale: float = 0.0  # 0: head_dim ** -0.5
    attn_soft_cap: float | None = None
    final_soft_cap: float | None = None
    windows: tuple[int | None, ...] = ()
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden); Granite by embedding_multiplier
    embed_norm: bool = False  # BLOOM's LayerNorm right after the embedding
    residual_multiplier: float = 1.0  # Granite scales each branch output
    logits_scale: float = 1.0  # Cohere multiplies the logits, Granite divides
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False
    clip_qkv: float | None = None  # OLMo, MPT clamp q/k/v
    moe: MoESpec | None = None
    mla: Any = None  # an llmctl.models.mla.MLASpec: DeepSeek's latent attention (num_kv_heads 1, head_dim = its cache)
    # Checkpoint names: regex renames onto this module's names, applied in order, then per-tensor transforms.
    renames: tuple[tuple[str, str], ...] = ()
    transforms: tuple[Transform, ...] = ()
    skipped: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def attention_features(self) -> frozenset[str]:
        out = set()
        if any(w for w in self.windows):
            out.add(FEATURE_SLIDING_WINDOW)
        if self.attn_soft_cap is not None:
            out.add(FEATURE_LOGITS_SOFT_CAP)
        if self.alibi:
            out.add(FEATURE_ALIBI)
        return frozenset(out)


# -- layers --------------------------------------------------------------------------------------------------


class LayerNorm(EngineModule):
    """LayerNorm in float32 (as the reference implementations compute it), with optional weight and bias."""

    def __init__(self, hidden_size: int, eps: float, *, weight: bool, bias: bool, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = empty_param(hidden_size, dtype=dtype, device=device) if weight else None
        self.bias = empty_param(hidden_size, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (self.hidden_size,), w, b, self.eps).to(x.dtype)


def make_norm(spec: DecoderSpec, ctx: ModelContext, size: int | None = None) -> nn.Module:
    size = size or spec.hidden_size
    kw = dict(dtype=ctx.dtype, device=ctx.device)
    if spec.norm == "rms":
        return RMSNorm(size, spec.norm_eps, ctx.ops, **kw)
    if spec.norm == "layer":
        return LayerNorm(size, spec.norm_eps, weight=True, bias=spec.norm_bias, **kw)
    if spec.norm == "layer_noparam":
        return LayerNorm(size, spec.norm_eps, weight=False, bias=False, **kw)
    raise ValueError(f"norm {spec.norm!r} is not supported")


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Activations by their Hugging Face names, from transformers' own table so they match bit for bit."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {', '.join(sorted(ACT2FN))}")
    return ACT2FN[name]


class GatedActMLP(EngineModule):
    """``down(act(gate(x)) * up(x))`` for activations other than SiLU (Gemma's tanh GELU)."""

    def __init__(self, hidden: int, inter: int, act: str, *, bias: bool, dtype: torch.dtype,
                 device: torch.device, tp: TensorParallelGroup = SINGLE) -> None:
        super().__init__()
        self.act = activation(act)
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=bias, dtype=dtype, device=device,
                                                       tp=tp)
        self.down_proj = RowParallelLinear(inter, hidden, bias=bias, dtype=dtype, device=device, tp=tp,
                                           what="intermediate_size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(self.act(gate) * up)


class PlainMLP(EngineModule):
    """``fc2(act(fc1(x)))`` (GPT-2, GPT-NeoX, OPT, StarCoder2, ...)."""

    def __init__(self, hidden: int, inter: int, act: str, *, bias: bool, dtype: torch.dtype,
                 device: torch.device, tp: TensorParallelGroup = SINGLE) -> None:
        super().__init__()
        self.act = activation(act)
        self.fc1 = ColumnParallelLinear(hidden, inter, bias=bias, dtype=dtype, device=device, tp=tp,
                                        what="intermediate_size")
        self.fc2 = RowParallelLinear(inter, hidden, bias=bias, dtype=dtype, device=device, tp=tp,
                                     what="intermediate_size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def make_mlp(spec: DecoderSpec, ctx: ModelContext, layer: int) -> nn.Module:
    kw = dict(dtype=ctx.dtype, device=ctx.device)
    if spec.moe is not None and layer not in spec.moe.dense_layers:
        from llmctl.models.moe import SparseMoE

        return SparseMoE(spec.hidden_size, spec.moe, spec.act, ctx)
    inter = spec.intermediate_size
    if spec.moe is not None and spec.moe.dense_intermediate_size:
        inter = spec.moe.dense_intermediate_size
    if spec.mlp == "plain":
        return PlainMLP(spec.hidden_size, inter, spec.act, bias=spec.mlp_bias, tp=ctx.tp, **kw)
    if spec.act in SILU_ACTS:
        return GatedMLP(spec.hidden_size, inter, spec.act, ctx.ops, bias=spec.mlp_bias, tp=ctx.tp, **kw)
    return GatedActMLP(spec.hidden_size, inter, spec.act, bias=spec.mlp_bias, tp=ctx.tp, **kw)


def build_rotary(hf_config: Any, head_dim: int, rotary_dim: int, ctx: ModelContext, *, neox_style: bool,
                 layer_type: str | None, max_position: int) -> RotaryEmbedding:
    """The cos|sin table of one rope configuration; per-layer-type configs (Gemma 3's local and global bases)
    are picked by ``layer_type``. LongRoPE (Phi-3) uses its short factors up to the original context and its long
    factors past it, position by position, so a sequence's rows never depend on the batch."""
    params = rope_parameters(hf_config)
    nested = getattr(hf_config, "rope_parameters", None)
    if layer_type is not None and isinstance(nested, dict) and isinstance(nested.get(layer_type), dict):
        params = dict(nested[layer_type])
        params["rope_type"] = params.get("rope_type", "default") or "default"
    rope_type = params["rope_type"]
    kw = dict(is_neox_style=neox_style, device=ctx.device)
    if rope_type == "default":
        base = float(params.get("rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        return RotaryEmbedding(inv_freq, 1.0, max_position, ctx.ops, **kw)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, "
                         f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
    init = ROPE_INIT_FUNCTIONS[rope_type]
    lt = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scaling = init(hf_config, torch.device("cpu"), **lt)
    rope = RotaryEmbedding(inv_freq.float(), float(scaling), max_position, ctx.ops, **kw)
    if rope_type == "longrope":
        original = int(params.get("original_max_position_embeddings")
                       or getattr(hf_config, "original_max_position_embeddings", 0) or max_position)
        if original < max_position:
            long_freq, _ = init(hf_config, torch.device("cpu"), seq_len=max_position, **lt)
            long = RotaryEmbedding(long_freq.float(), float(scaling), max_position, ctx.ops, **kw)
            rope.cos_sin_cache[original:] = long.cos_sin_cache[original:]
    return rope


class DecoderAttention(EngineModule):
    """Under tensor parallelism a rank computes its share of the heads, as in the Llama family: ``qkv_proj``
    holds their rows (KV heads split, or replicated when there are fewer than ranks) and ``o_proj`` sums the
    ranks' partial outputs. ALiBi slopes are the rank's heads' slopes."""

    def __init__(self, spec: DecoderSpec, ctx: ModelContext, layer: int, rotary: RotaryEmbedding | None) -> None:
        super().__init__()
        kw = dict(dtype=ctx.dtype, device=ctx.device)
        self.head_dim = spec.head_dim
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.num_heads, spec.num_kv_heads, self.head_dim,
                                          bias=spec.qkv_bias, tp=ctx.tp, **kw)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_local_heads, self.qkv_proj.num_local_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(spec.num_heads * self.head_dim, spec.hidden_size, bias=spec.o_bias, tp=ctx.tp,
                                        what="num_attention_heads * head_dim", **kw)
        self.qk_norm = spec.qk_norm
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if spec.qk_norm == "head":
            self.q_norm, self.k_norm = make_norm(spec, ctx, self.head_dim), make_norm(spec, ctx, self.head_dim)
        elif spec.qk_norm == "full":
            self.q_norm, self.k_norm = make_norm(spec, ctx, self.q_size), make_norm(spec, ctx, self.kv_size)
        self.clip_qkv = spec.clip_qkv
        self.rotary = rotary
        window = spec.windows[layer] if spec.windows else None
        slopes = None
        if spec.alibi:
            slopes = alibi_slopes(spec.num_heads) * spec.extra.get("alibi_scale", 1.0)
            slopes = slopes[ctx.tp.rank * self.num_heads:(ctx.tp.rank + 1) * self.num_heads].to(ctx.device)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, spec.scale or self.head_dim**-0.5,
                              ctx.attention, window, logits_soft_cap=spec.attn_soft_cap, alibi_slopes=slopes)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = self.qkv_proj.split(qkv)
        t = hidden.shape[0]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, metadata))


class DecoderLayer(EngineModule):
    def __init__(self, spec: DecoderSpec, ctx: ModelContext, layer: int, rotary: RotaryEmbedding | None) -> None:
        super().__init__()
        self.layout = spec.layout
        self.residual_multiplier = spec.residual_multiplier
        if spec.mla is not None:
            from llmctl.models.mla import MLAAttention

            self.self_attn = MLAAttention(spec.hidden_size, spec.num_heads, spec.mla, spec.scale, spec.qkv_bias,
                                          spec.norm_eps, ctx, rotary)
        else:
            self.self_attn = DecoderAttention(spec, ctx, layer, rotary)
        self.mlp = make_mlp(spec, ctx, layer)
        norms = {"pre": ("input_layernorm", "post_attention_layernorm"),
                 "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                              "post_feedforward_layernorm"),
                 "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
                 "parallel": ("input_layernorm",),
                 "parallel2": ("input_layernorm", "post_attention_layernorm")}
        if spec.layout not in norms:
            raise ValueError(f"decoder layout {spec.layout!r} is not supported")
        for name in norms[spec.layout]:
            setattr(self, name, make_norm(spec, ctx))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        m = self.residual_multiplier
        layout = self.layout
        if layout == "parallel":
            normed = self.input_layernorm(hidden)
            return hidden + self.self_attn(positions, normed, kv_cache, metadata) + self.mlp(normed)
        if layout == "parallel2":
            attn = self.self_attn(positions, self.input_layernorm(hidden), kv_cache, metadata)
            return hidden + attn + self.mlp(self.post_attention_layernorm(hidden))
        if layout == "post":
            hidden = hidden + self.post_attention_layernorm(self.self_attn(positions, hidden, kv_cache, metadata))
            return hidden + self.post_feedforward_layernorm(self.mlp(hidden))
        attn = self.self_attn(positions, self.input_layernorm(hidden), kv_cache, metadata)
        if layout == "sandwich":
            hidden = hidden + self.post_attention_layernorm(attn) * m
            return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden))) * m
        hidden = hidden + attn * m
        return hidden + self.mlp(self.post_attention_layernorm(hidden)) * m


class DecoderModel(EngineModule):
    """Under pipeline parallelism a stage builds only its layers (``ctx.pp.layer_range``): the first embeds, the
    others receive the previous stage's hidden states (the residual stream is the hidden state itself here), and
    all but the last send theirs on."""

    def __init__(self, spec: DecoderSpec, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__()
        kw = dict(dtype=ctx.dtype, device=ctx.device)
        self.spec = spec
        self.pp = ctx.pp
        self.start_layer, self.end_layer = ctx.pp.layer_range(spec.num_layers)
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp=ctx.tp, **kw)
        self.embed_positions = (VocabEmbedding(spec.learned_positions, spec.hidden_size, **kw)
                                if spec.learned_positions else None)
        self.embed_norm = make_norm(replace_norm(spec, "layer"), ctx) if spec.embed_norm else None
        max_position = int(getattr(hf_config, "max_position_embeddings", None) or 4096)
        ropes: dict[tuple[int, str | None], RotaryEmbedding] = {}  # one table per distinct configuration
        layers = []
        for i in range(spec.num_layers):
            if not self.start_layer <= i < self.end_layer:
                layers.append(OtherStageLayer())
                continue
            rotary = None
            dim = spec.rotary_dims[i] if spec.rotary_dims else 0
            if dim:
                lt = spec.layer_rope_types[i] if spec.layer_rope_types else None
                if (dim, lt) not in ropes:
                    ropes[(dim, lt)] = build_rotary(hf_config, spec.head_dim, dim, ctx, neox_style=spec.rope_neox_style,
                                                    layer_type=lt, max_position=max_position)
                rotary = ropes[(dim, lt)]
            layers.append(DecoderLayer(spec, ctx, i, rotary))
        self.layers = nn.ModuleList(layers)
        self.norm = make_norm(spec, ctx)
        self.dtype = ctx.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        """``kv_caches`` holds this stage's layers only. A stage other than the last returns its hidden states
        unnormalised; they are never sampled from (the last stage's logits are broadcast instead)."""
        pp = self.pp
        if pp.is_first:
            hidden = self.embed(input_ids, positions)
        else:
            hidden, = pp.recv_prev(torch.empty((input_ids.shape[0], self.spec.hidden_size), dtype=self.dtype,
                                               device=input_ids.device))
        layers = self.layers[self.start_layer:self.end_layer] if pp.size > 1 else self.layers
        for layer, kv_cache in zip(layers, kv_caches, strict=True):
            hidden = layer(positions, hidden, kv_cache, metadata)
        if not pp.is_last:
            pp.send_next(hidden)
            return hidden
        return self.norm(hidden)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.spec.embed_scale != 1.0:
            hidden = hidden * torch.tensor(self.spec.embed_scale, dtype=hidden.dtype)
        if self.embed_positions is not None:
            hidden = hidden + self.embed_positions(positions + self.spec.position_offset)
        if self.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        return hidden


def replace_norm(spec: DecoderSpec, norm: str) -> DecoderSpec:
    from dataclasses import replace

    return replace(spec, norm=norm, norm_bias=True)


def row_parallel_layers(spec: DecoderSpec, expert_parallel: bool = False) -> list[tuple[str, int]]:
    """(module prefix, in_features) of every row-parallel projection: each layer's o_proj and its MLP's down
    projection (a MoE layer's shared expert's, and its routed experts' unless expert parallelism holds them
    whole)."""
    out = []
    for i in range(spec.num_layers):
        out.append((f"model.layers.{i}.self_attn.o_proj", spec.num_heads * spec.head_dim))
        moe = spec.moe
        if moe is not None and i not in moe.dense_layers:
            if not expert_parallel:
                out += [(f"model.layers.{i}.mlp.experts.{e}.down_proj", moe.intermediate_size)
                        for e in range(moe.num_experts)]
            if moe.shared_intermediate_size:
                out.append((f"model.layers.{i}.mlp.shared_expert.down_proj", moe.shared_intermediate_size))
            continue
        inter = moe.dense_intermediate_size if moe is not None and moe.dense_intermediate_size else \
            spec.intermediate_size
        out.append((f"model.layers.{i}.mlp.{'fc2' if spec.mlp == 'plain' else 'down_proj'}", inter))
    return out


_STACKED: tuple[tuple[str, str, int], ...] = (
    (".q_proj.", ".qkv_proj.", 0),
    (".k_proj.", ".qkv_proj.", 1),
    (".v_proj.", ".qkv_proj.", 2),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)
_ALWAYS_SKIPPED = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


class DecoderForCausalLM(EngineModule):
    """Follows :class:`llmctl.models.base.CausalLM`. Subclasses only name the family (``spec_from_config``)."""

    family = ""
    supports_tensor_parallel = True  # its layers take ctx.tp (llmctl.layers.parallel); check_tensor_parallel refuses
    supports_pipeline_parallel = True  # DecoderModel builds only ctx.pp's layers

    @classmethod
    def check_tensor_parallel(cls, hf_config: Any, size: int, quant: Any = None, expert_parallel: bool = False
                              ) -> None:
        """Refuse at start-up, naming the family and the setting, what this decoder cannot split over ``size``
        ranks: latent attention (MLA), q/k norms over all heads, widths the ranks do not divide (experts placed
        whole by expert parallelism keep their width), and a quantized row-parallel layer whose rank's input
        columns would cut a group, a packed word or a block."""
        if size == 1:
            return
        spec = cls.spec_from_config(hf_config)
        refused = "multi-head latent attention (MLA)" if spec.mla is not None else \
            "a q/k RMSNorm over all heads (qk_norm over the full width)" if spec.qk_norm == "full" else None
        if refused:
            raise ValueError(f"tensor_parallel_size: the {cls.family} family uses {refused}, which has no "
                             f"tensor-parallel split yet; use tensor_parallel_size=1")
        split_evenly(spec.num_heads, size, "num_attention_heads")
        kv_head_slice(spec.num_kv_heads, size, 0)
        widths = [("intermediate_size", spec.intermediate_size)] if spec.moe is None else \
            [("moe_intermediate_size", 0 if expert_parallel else spec.moe.intermediate_size),
             ("shared_expert_intermediate_size", spec.moe.shared_intermediate_size),
             ("intermediate_size", spec.moe.dense_intermediate_size if spec.moe.dense_layers else 0)]
        for what, width in widths:
            if width:
                split_evenly(width, size, what)
        if quant is not None:
            from llmctl.quantization.sharding import check_row_splits

            check_row_splits(quant, hf_config, size, row_parallel_layers(spec, expert_parallel))

    @classmethod
    def expert_parallel_num_experts(cls, hf_config: Any) -> int:
        """Experts per MoE layer (0 without MoE layers): what ``enable_expert_parallel`` places per rank."""
        spec = cls.spec_from_config(hf_config)
        return spec.moe.num_experts if spec.moe is not None else 0

    @classmethod
    def spec_from_config(cls, hf_config: Any) -> DecoderSpec:
        from llmctl.models.families import spec_for

        return spec_for(cls.family, hf_config)

    @classmethod
    def attention_features(cls, hf_config: Any) -> frozenset[str]:
        return cls.spec_from_config(hf_config).attention_features()

    @classmethod
    def attention_head_size(cls, hf_config: Any) -> int:
        """The cache's head size, which MLA makes differ from the config's ``head_dim``."""
        return cls.spec_from_config(hf_config).head_dim

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.config = hf_config
        self.ctx = ctx
        self.spec = spec = self.spec_from_config(hf_config)
        self.model = DecoderModel(spec, hf_config, ctx)
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size,
                                      tied_to=self.model.embed_tokens if spec.tie_word_embeddings else None,
                                      dtype=ctx.dtype, device=ctx.device, tp=ctx.tp)
        self.lm_head_bias = empty_param(spec.vocab_size, dtype=ctx.dtype, device=ctx.device) \
            if spec.lm_head_bias else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return stage_logits(self.ctx.pp, hidden, self.spec.vocab_size, self._logits)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.lm_head_bias is not None:
            logits = logits + self.lm_head_bias
        if self.spec.logits_scale != 1.0:
            logits = logits * self.spec.logits_scale
        cap = self.spec.final_soft_cap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def kv_cache_spec(self) -> KVCacheSpec:
        """Under tensor parallelism each rank caches only its KV heads, and a pipeline stage only its layers."""
        start, end = self.model.start_layer, self.model.end_layer
        windows = list(self.spec.windows[start:end]) or [None]
        uniform = windows[0] if len(set(windows)) == 1 else None
        kv_heads = getattr(self.model.layers[start].self_attn, "num_kv_heads", self.spec.num_kv_heads)
        return KVCacheSpec(num_layers=end - start, num_kv_heads=kv_heads,
                           head_size=self.spec.head_dim, sliding_window=uniform)

    # -- loading ---------------------------------------------------------------------------------------------
    def module_name(self, checkpoint_name: str) -> str:
        """A checkpoint tensor's name under this module (the family's renames; fused tensors keep their name, the
        merged layer that owns them splits them): a quantization config keyed by checkpoint names (GGUF's tensor
        types) finds the layers by it."""
        for pattern, repl in self._renames():
            checkpoint_name = pattern.sub(repl, checkpoint_name)
        return checkpoint_name

    def _renames(self) -> list[tuple[re.Pattern[str], str]]:
        return [(re.compile(p), r) for p, r in self.spec.renames]

    def canonical_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        spec = self.spec
        renames = self._renames()
        for name, tensor in weights:
            if any(s in name for s in _ALWAYS_SKIPPED) or any(re.search(s, name) for s in spec.skipped):
                continue
            for pattern, repl in renames:
                name = pattern.sub(repl, name)
            if not on_stage(name, self.model.start_layer, self.model.end_layer):
                continue  # another pipeline stage's layer: left unread
            if name == "lm_head.bias":
                name = "lm_head_bias"
            if spec.transforms and not isinstance(tensor, torch.Tensor):
                tensor = materialize(tensor)  # a rank reads a transformed tensor whole, then takes its slice
            items = [(name, tensor)]
            for transform in spec.transforms:
                items = [out for n, t in items for out in transform(n, t, self._out_layout(n))]
            yield from items

    def _out_layout(self, name: str) -> OutLayout:
        """How a quantized layer's checkpoint tensor runs along the outputs, for the transforms that cut fused
        q/k/v: the layout of the attention's ``qkv_proj`` (the only fused projection a transform cuts)."""
        prefix, _, leaf = name.rpartition(".")
        if self.ctx.quant is None or leaf == "bias":
            return PLAIN_OUT
        try:
            layer = self.get_submodule(prefix.rpartition(".")[0] + ".qkv_proj")
        except AttributeError:
            return PLAIN_OUT
        quantizer = getattr(layer, "quantizer", None)
        p = None if quantizer is None else quantizer._params.get(leaf)
        if p is None:
            return PLAIN_OUT
        return OutLayout(p.out_dim, p.out_pack, lambda t, sizes: quantizer.fused_parts(leaf, t, sizes))

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Renames and transforms checkpoint tensors onto this module, fuses q/k/v and gate/up while copying, and
        raises on unknown or missing tensors so a wrong checkpoint never runs on uninitialised memory."""
        params = dict(self.named_parameters(remove_duplicate=False))
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        tied = self.spec.tie_word_embeddings
        for name, tensor in self.canonical_weights(weights):
            if name == "lm_head.weight" and tied:
                continue
            if self.spec.norm_offset and "norm" in name.rsplit(".", 2)[-2] and name.endswith(".weight"):
                tensor = materialize(tensor).float() + self.spec.norm_offset
            if ".experts." in name:  # a mixture-of-experts layer stacks its experts' tensors itself
                owner_name, rest = name.split(".experts.", 1)
                owner = modules.get(owner_name)
                if not hasattr(owner, "load_expert_tensor"):
                    raise ValueError(f"checkpoint tensor {name} has no place in {type(self).__name__}")
                owner.load_expert_tensor(rest, tensor, name)
                continue
            for hf_part, fused_part, shard in _STACKED:
                if hf_part in name:
                    target = name.replace(hf_part, fused_part)
                    owner = modules.get(target.rsplit(".", 1)[0])
                    if target in params and isinstance(owner, MergedLinear):
                        owner.load_shard(params[target], shard, tensor, name)
                        loaded.add(f"{target}#{shard}")
                        break
            else:
                owner = modules.get(name.rsplit(".", 1)[0])
                if isinstance(owner, MergedLinear) and name in params:  # a fused tensor in the checkpoint
                    load_stacked_tensor(owner, params[name], tensor, name)
                    loaded.update(f"{name}#{shard}" for shard in range(len(owner.output_sizes)))
                    continue
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name} has no place in {type(self).__name__}")
                load_param = getattr(owner, "load_param", None)  # a split layer reads its rank's slice itself
                if load_param is not None:
                    load_param(params[name], tensor, name)
                else:
                    copy_checked(params[name].data, tensor, name)
                loaded.add(name)
        self._check_complete(loaded, params)

    def _check_complete(self, loaded: set[str], params: dict[str, nn.Parameter]) -> None:
        missing = []
        for pname in params:
            module = self.get_submodule(pname.rsplit(".", 1)[0] if "." in pname else "")
            if hasattr(module, "missing_expert_tensors") and pname.endswith((".w13", ".w2")):
                missing += module.missing_expert_tensors(pname)
            elif isinstance(module, MergedLinear):
                missing += [f"{pname}#{i}" for i in range(len(module.output_sizes)) if f"{pname}#{i}" not in loaded]
            elif pname not in loaded and not (pname == "lm_head.weight" and self.spec.tie_word_embeddings):
                missing.append(pname)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}")
