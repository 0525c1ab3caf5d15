"""One decoder for the Llama family: Llama 2/3 (SmolLM2, TinyLlama), Mistral, Qwen2 and Qwen3.

They differ only in switches read from the Hugging Face config: sliding-window attention (Mistral, Qwen2 with
``use_sliding_window``), biases on q/k/v (Qwen2), and per-head RMSNorm of q and k before RoPE (Qwen3).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from llmctl.attention import AttentionMetadata
from llmctl.layers import Attention, GatedMLP, RMSNorm, get_rope
from llmctl.layers._module import EngineModule
from llmctl.layers.fused_loading import STACKED_QKV_GATE_UP, load_fused, missing_tensors
from llmctl.layers.parallel import (
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from llmctl.models.base import KVCacheSpec, ModelContext
from llmctl.models.pipeline import OtherStageLayer, on_stage, stage_logits

_SKIPPED = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def layer_sliding_windows(cfg: Any) -> list[int | None]:
    """The window of each layer. Qwen-style configs list per-layer types (``max_window_layers``); Mistral-style
    ones apply ``sliding_window`` everywhere. Transformers already nulls ``sliding_window`` when Qwen's
    ``use_sliding_window`` is off."""
    window = getattr(cfg, "sliding_window", None)
    n = cfg.num_hidden_layers
    if not window:
        return [None] * n
    types = getattr(cfg, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [int(window)] * n


class LlamaAttention(EngineModule):
    """Under tensor parallelism a rank computes its share of the heads (``qkv_proj`` holds only their rows) and
    ``o_proj`` sums the ranks' partial outputs."""

    def __init__(self, cfg: Any, ctx: ModelContext, sliding_window: int | None, rotary_emb: nn.Module) -> None:
        super().__init__()
        total_heads = cfg.num_attention_heads
        total_kv_heads = getattr(cfg, "num_key_value_heads", None) or total_heads
        self.head_dim = _head_dim(cfg)
        bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
        kw = dict(dtype=ctx.dtype, device=ctx.device)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, total_heads, total_kv_heads, self.head_dim, bias=bias,
                                          tp=ctx.tp, **kw)
        self.num_heads = self.qkv_proj.num_local_heads
        self.num_kv_heads = self.qkv_proj.num_local_kv_heads
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, cfg.hidden_size,
                                        bias=bool(getattr(cfg, "attention_bias", False)), tp=ctx.tp,
                                        what="num_attention_heads * head_dim", **kw)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if cfg.model_type == "qwen3":
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ctx.ops, **kw)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ctx.ops, **kw)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, ctx.attention,
                              sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        t = hidden.shape[0]
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, metadata))


class LlamaDecoderLayer(EngineModule):
    def __init__(self, cfg: Any, ctx: ModelContext, sliding_window: int | None, rotary_emb: nn.Module) -> None:
        super().__init__()
        kw = dict(dtype=ctx.dtype, device=ctx.device)
        self.self_attn = LlamaAttention(cfg, ctx, sliding_window, rotary_emb)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, getattr(cfg, "hidden_act", "silu"), ctx.ops,
                            bias=bool(getattr(cfg, "mlp_bias", False)), tp=ctx.tp, **kw)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.ops, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.ops, **kw)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor, metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(EngineModule):
    """Under pipeline parallelism a stage builds only its layers (``ctx.pp.layer_range``): the first embeds, the
    others receive the previous stage's hidden states and residual, and all but the last send theirs on."""

    def __init__(self, cfg: Any, ctx: ModelContext) -> None:
        super().__init__()
        kw = dict(dtype=ctx.dtype, device=ctx.device)
        self.pp = ctx.pp
        self.hidden_size = cfg.hidden_size
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp=ctx.tp, **kw)
        windows = layer_sliding_windows(cfg)
        # One cos/sin table for all layers: it depends only on the config, and building it per layer cost seconds.
        rotary_emb = get_rope(cfg, _head_dim(cfg), ctx.ops, ctx.device)
        self.start_layer, self.end_layer = ctx.pp.layer_range(cfg.num_hidden_layers)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, ctx, windows[i], rotary_emb)
                                    if self.start_layer <= i < self.end_layer else OtherStageLayer()
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.ops, **kw)
        # Set only under an EAGLE-3 proposer: the layers whose inputs the forward also keeps, concatenated in
        # this order, in ``aux_hidden_states`` (an empty tuple costs the loop nothing).
        self.aux_hidden_state_layers: tuple[int, ...] = ()
        self.aux_hidden_states: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``kv_caches`` holds this stage's layers only. A stage other than the last returns its hidden states
        unnormalised; they are never sampled from (the last stage's logits are broadcast instead).
        ``inputs_embeds`` replaces the first stage's token embeddings (a multimodal model's image rows merged in)."""
        pp = self.pp
        residual: torch.Tensor | None = None
        if pp.is_first:
            hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        else:
            shape = (input_ids.shape[0], self.hidden_size)
            dtype, device = self.norm.weight.dtype, self.norm.weight.device
            hidden, residual = pp.recv_prev(torch.empty(shape, dtype=dtype, device=device),
                                            torch.empty(shape, dtype=dtype, device=device))
        layers = self.layers[self.start_layer:self.end_layer] if pp.size > 1 else self.layers
        first = self.start_layer if pp.size > 1 else 0
        aux_layers = self.aux_hidden_state_layers  # never set under pipeline parallelism (eagle3 refuses it)
        aux: dict[int, torch.Tensor] = {}
        for i, (layer, kv_cache) in enumerate(zip(layers, kv_caches, strict=True), start=first):
            if aux_layers and i in aux_layers:  # the residual stream entering layer i (EAGLE-3's features)
                aux[i] = hidden.clone() if residual is None else hidden + residual  # norms may add in place
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        if aux_layers:
            self.aux_hidden_states = torch.cat([aux[i] for i in aux_layers], dim=-1)
        if not pp.is_last:
            pp.send_next(hidden, residual)
            return hidden
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(EngineModule):
    """Follows :class:`llmctl.models.base.CausalLM`; registered for every architecture name it covers."""

    supports_tensor_parallel = True  # its layers take ctx.tp (llmctl.layers.parallel)
    supports_pipeline_parallel = True  # LlamaModel builds only ctx.pp's layers

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.config = hf_config
        self.ctx = ctx
        self.model = LlamaModel(hf_config, ctx)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size,
                                      tied_to=self.model.embed_tokens if self.tie_word_embeddings else None,
                                      dtype=ctx.dtype, device=ctx.device, tp=ctx.tp)
        start, end = self.model.start_layer, self.model.end_layer
        self._windows = layer_sliding_windows(hf_config)[start:end]  # this pipeline stage's layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``inputs_embeds`` replaces the token embeddings (a multimodal model's image rows already merged in)."""
        return self.model(input_ids, positions, kv_caches, metadata, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return stage_logits(self.ctx.pp, hidden, self.config.vocab_size, self.lm_head)

    def kv_cache_spec(self) -> KVCacheSpec:
        """One window for the whole model only when every layer slides by it; a mix needs the full context kept.
        A pipeline stage caches only its own layers."""
        attn = self.model.layers[self.model.start_layer].self_attn
        uniform = self._windows[0] if len(set(self._windows)) == 1 else None
        return KVCacheSpec(num_layers=self.model.end_layer - self.model.start_layer, num_kv_heads=attn.num_kv_heads,
                           head_size=attn.head_dim, sliding_window=uniform)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fuses q/k/v and gate/up while copying; raises on unknown or missing tensors so a wrong checkpoint
        never runs with uninitialised memory."""
        params = dict(self.named_parameters(remove_duplicate=False))
        modules = dict(self.named_modules())
        tied_head = self.tie_word_embeddings
        kept = ((name, tensor) for name, tensor in weights
                if not any(s in name for s in _SKIPPED) and not (name == "lm_head.weight" and tied_head)
                and self._on_this_stage(name))
        loaded = load_fused(kept, params, modules, STACKED_QKV_GATE_UP,
                            lambda name: f"checkpoint tensor {name} has no place in {type(self).__name__}")
        missing = missing_tensors(params, modules, loaded, optional=lambda p: p == "lm_head.weight" and tied_head)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}")

    def _on_this_stage(self, name: str) -> bool:
        """Tensors of other pipeline stages' layers are skipped unread (the embedding, final norm and LM head are
        kept on every stage)."""
        return self.ctx.pp.size == 1 or on_stage(name, self.model.start_layer, self.model.end_layer)


ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
