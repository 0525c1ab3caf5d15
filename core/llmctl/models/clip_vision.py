"""CLIP's image tower (the vision side of a ``CLIPModel`` checkpoint) for image embeddings.

It runs eagerly on the preprocessed pixels of a step's image requests, outside the paged KV cache: an image is
encoded once, every patch attends to every patch, and nothing of it is reused later, so there is no cache to
page (vLLM runs multimodal encoders the same way). Patch embedding, class token and positions, pre-LayerNorm
layers, the post-LayerNorm of the class token, then the visual projection, as transformers computes them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.layers import Linear
from llmctl.layers._module import EngineModule
from llmctl.layers._params import empty_param
from llmctl.models.bert import LayerNorm, _activation


class _VisionAttention(EngineModule):
    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.num_heads
        self.q_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, **kw)
        self.k_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, **kw)
        self.v_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, **kw)
        self.out_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


class _VisionMLP(EngineModule):
    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, **kw)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _VisionLayer(EngineModule):
    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.self_attn = _VisionAttention(cfg, kw)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = _VisionMLP(cfg, kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _VisionEmbeddings(EngineModule):
    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = empty_param(cfg.hidden_size, **kw)
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=False, **kw)
        self.patch_embedding.weight.requires_grad_(False)
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, cfg.hidden_size, **kw)
        self.position_embedding.weight.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1)
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(f"multi_modal_data: the image gives {x.shape[1] - 1} patches, the model was trained on "
                             f"{self.position_embedding.num_embeddings - 1}")
        return x + self.position_embedding.weight


class _VisionEncoder(EngineModule):
    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_VisionLayer(cfg, kw) for _ in range(cfg.num_hidden_layers))


class _SiglipVisionEmbeddings(EngineModule):
    """SigLIP's: a biased patch projection and one position per patch, no class token."""

    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=True, **kw)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size, **kw)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(f"multi_modal_data: the image gives {x.shape[1]} patches, the model was trained on "
                             f"{self.position_embedding.num_embeddings}")
        return x + self.position_embedding.weight


class _AttentionPoolingHead(EngineModule):
    """SigLIP's multihead attention pooling: a learned probe attends over the patches, then LayerNorm + MLP."""

    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.probe = empty_param(1, 1, cfg.hidden_size, **kw)
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, batch_first=True, **kw)
        self.layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = _VisionMLP(cfg, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attention(self.probe.expand(x.shape[0], 1, -1), x, x, need_weights=False)[0]
        return (h + self.mlp(self.layernorm(h)))[:, 0]


class SiglipVisionTransformer(EngineModule):
    """transformers' SigLIP ``vision_model``: its pooled output is already the image embedding."""

    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.embeddings = _SiglipVisionEmbeddings(cfg, kw)
        self.encoder = _VisionEncoder(cfg, kw)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.head = _AttentionPoolingHead(cfg, kw)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.head(self.post_layernorm(x))


class ClipVisionTransformer(EngineModule):
    """transformers' ``vision_model`` (its misspelt ``pre_layrnorm`` kept, so checkpoint names map directly)."""

    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.embeddings = _VisionEmbeddings(cfg, kw)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.encoder = _VisionEncoder(cfg, kw)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, hidden]: the class token after the last layer and the post-LayerNorm."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])
