"""CLIP as an embedding model: ``CLIPTextModelWithProjection``, or a ``CLIPModel`` checkpoint with both towers.

Text: pre-LayerNorm transformer layers with causal attention over the paged KV cache, the final LayerNorm, then
the text projection; the embedding is the projected state of the last token, which is the end-of-text token the
CLIP tokenizer appends (transformers pools at that token too). Images (``CLIPModel`` only): the vision tower of
:mod:`llmctl.models.clip_vision` on the request's preprocessed pixels, then the visual projection; an image
request holds one placeholder token in the engine, and the runner pools the image embedding in its place.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from llmctl.attention import AttentionMetadata
from llmctl.layers import Attention, Linear, MergedLinear, VocabEmbedding
from llmctl.layers._module import EngineModule
from llmctl.layers._params import copy_checked
from llmctl.layers.encoder_attention import BIDIRECTIONAL, EncoderAttention
from llmctl.models.base import KVCacheSpec, ModelContext
from llmctl.models.bert import LayerNorm, _activation
from llmctl.models.clip_vision import ClipVisionTransformer, SiglipVisionTransformer
from llmctl.pooling.pooler import EmbeddingPooler, PoolerConfig

_QKV = ((".self_attn.q_proj.", 0), (".self_attn.k_proj.", 1), (".self_attn.v_proj.", 2))
_SKIPPED_PREFIXES = ("logit_scale", "logit_bias", "text_model.embeddings.position_ids",
                     "vision_model.embeddings.position_ids")


class _ClipAttention(EngineModule):
    def __init__(self, cfg: Any, ctx: ModelContext, kw: dict, causal: bool) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.num_heads
        size = self.num_heads * self.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, [size, size, size], bias=True, **kw)
        self.out_proj = Linear(size, cfg.hidden_size, bias=True, **kw)
        attn_cls = Attention if causal else EncoderAttention  # SigLIP's text tower is bidirectional
        self.attn = attn_cls(self.num_heads, self.num_heads, self.head_dim, self.head_dim**-0.5, ctx.attention)

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        shape = (hidden.shape[0], self.num_heads, self.head_dim)
        return self.out_proj(self.attn(q.reshape(shape), k.reshape(shape), v.reshape(shape), kv_cache, metadata))


class _ClipMLP(EngineModule):
    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, **kw)
        self.act = _activation(cfg.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden)))


class _ClipLayer(EngineModule):
    def __init__(self, cfg: Any, ctx: ModelContext, kw: dict, causal: bool) -> None:
        super().__init__()
        self.self_attn = _ClipAttention(cfg, ctx, kw, causal)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = _ClipMLP(cfg, kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden), kv_cache, metadata)
        return hidden + self.mlp(self.layer_norm2(hidden))


class _ClipEmbeddings(EngineModule):
    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.token_embedding = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embedding = VocabEmbedding(cfg.max_position_embeddings, cfg.hidden_size, **kw)


class _ClipEncoder(EngineModule):
    def __init__(self, cfg: Any, ctx: ModelContext, kw: dict, causal: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_ClipLayer(cfg, ctx, kw, causal) for _ in range(cfg.num_hidden_layers))


class _ClipTextTransformer(EngineModule):
    def __init__(self, cfg: Any, ctx: ModelContext, kw: dict, causal: bool, head: bool) -> None:
        super().__init__()
        self.embeddings = _ClipEmbeddings(cfg, kw)
        self.encoder = _ClipEncoder(cfg, ctx, kw, causal)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        # SigLIP's text head (CLIP projects outside the text model instead)
        size = getattr(cfg, "projection_size", None) or cfg.hidden_size
        self.head = Linear(cfg.hidden_size, size, bias=True, **kw) if head else None


class ClipTextEmbeddingModel(EngineModule):
    is_pooling_model = True
    attention_features: frozenset[str] = frozenset()
    siglip = False

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__()
        cfg = getattr(hf_config, "text_config", None) or hf_config
        self.config = cfg
        kw = dict(dtype=ctx.dtype, device=ctx.device)
        self.text_model = _ClipTextTransformer(cfg, ctx, kw, causal=not self.siglip, head=self.siglip)
        self.text_projection: Linear | None = None
        if not self.siglip:
            projection_dim = getattr(hf_config, "projection_dim", None) or cfg.projection_dim
            self.text_projection = Linear(cfg.hidden_size, projection_dim, bias=False, **kw)
        vision_cfg = getattr(hf_config, "vision_config", None)
        self.vision_model: ClipVisionTransformer | SiglipVisionTransformer | None = None
        self.visual_projection: Linear | None = None
        if vision_cfg is not None and self.siglip:
            self.vision_model = SiglipVisionTransformer(vision_cfg, kw)
        elif vision_cfg is not None:
            self.vision_model = ClipVisionTransformer(vision_cfg, kw)
            self.visual_projection = Linear(vision_cfg.hidden_size, projection_dim, bias=False, **kw)
        pc: PoolerConfig = ctx.extra.get("pooler_config") or PoolerConfig()
        self.pooler = EmbeddingPooler(pc.pooling_type or "LAST", True if pc.normalize is None else pc.normalize)

    @staticmethod
    def max_context(hf_config: Any) -> int:
        return (getattr(hf_config, "text_config", None) or hf_config).max_position_embeddings

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        """The projected state of every token (``[num_tokens, projection_dim]``): pooling picks the last."""
        emb = self.text_model.embeddings
        hidden = emb.token_embedding(input_ids) + emb.position_embedding(positions)
        for layer, kv_cache in zip(self.text_model.encoder.layers, kv_caches, strict=True):
            hidden = layer(hidden, kv_cache, metadata)
        hidden = self.text_model.final_layer_norm(hidden)
        return self.text_model.head(hidden) if self.text_projection is None else self.text_projection(hidden)

    @property
    def accepts_images(self) -> bool:
        return self.vision_model is not None

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] preprocessed pixels -> [n, projection_dim] image embeddings (before normalisation)."""
        if self.vision_model is None:
            raise ValueError("multi_modal_data: this checkpoint has no image tower")
        pooled = self.vision_model(pixel_values)
        return pooled if self.visual_projection is None else self.visual_projection(pooled)

    def kv_cache_spec(self) -> KVCacheSpec:
        attn = self.text_model.encoder.layers[0].self_attn
        return KVCacheSpec(num_layers=len(self.text_model.encoder.layers), num_kv_heads=attn.num_heads,
                           head_size=attn.head_dim)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith(_SKIPPED_PREFIXES):
                continue
            for part, shard in _QKV:
                if part in name and name.startswith("text_model."):  # the vision tower keeps q/k/v apart
                    target = name.replace(part, ".self_attn.qkv_proj.")
                    module = modules.get(target.rsplit(".", 1)[0])
                    if target not in params or not isinstance(module, MergedLinear):
                        raise ValueError(f"checkpoint tensor {name} has no place in {type(self).__name__}")
                    module.load_shard(params[target], shard, tensor, name)
                    loaded.add(f"{target}#{shard}")
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name} has no place in {type(self).__name__}")
                copy_checked(params[name].data, tensor, name)
                loaded.add(name)
        missing = []
        for pname in params:
            if isinstance(modules[pname.rsplit(".", 1)[0]], MergedLinear):
                missing += [f"{pname}#{i}" for i in range(3) if f"{pname}#{i}" not in loaded]
            elif pname not in loaded:
                missing.append(pname)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}")


class SiglipEmbeddingModel(ClipTextEmbeddingModel):
    """SigLIP (``SiglipModel``, ``SiglipTextModel``): CLIP's layout with a bidirectional text tower pooled at its
    last token through ``text_model.head``, and an image tower pooled by attention (no class token, no
    projection). SigLIP was trained on text padded to its full length; like transformers, the engine embeds
    exactly the tokens it is given, so pad the text the way the checkpoint's processor does to match its
    training."""

    attention_features = frozenset({BIDIRECTIONAL})
    siglip = True


ARCHITECTURES: dict[str, type] = {
    "CLIPTextModelWithProjection": ClipTextEmbeddingModel,
    "CLIPModel": ClipTextEmbeddingModel,
    "SiglipModel": SiglipEmbeddingModel,
    "SiglipTextModel": SiglipEmbeddingModel,
}
