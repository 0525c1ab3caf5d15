"""DeepSeek's multi-head latent attention (MLA) on llmctl's paged KV cache, with the cache compressed.

Each token caches its normalised KV latent ``c`` (``kv_lora_rank`` wide) and its one shared rotary key ``k_pe``
instead of per-head keys and values. Attention runs in the latent space ("weight absorption"): the per-head
key up-projection ``W_UK`` is folded into the query (``q_nope @ W_UK``), so every head attends to the same
single KV head ``[c, k_pe]``; the output is the softmax-weighted latent, which ``W_UV`` lifts back per head.
To any attention backend this is plain multi-query attention with one KV head of ``kv_lora_rank +
qk_rope_head_dim`` dims; the value slot holds ``[c, 0]`` (the backend's cache keeps keys and values the same
width), so a token costs ``2 * (kv_lora_rank + rope)`` cache entries instead of ``heads * (qk_head + v_head)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.attention import AttentionMetadata
from llmctl.layers import Attention, RMSNorm
from llmctl.layers._module import EngineModule
from llmctl.layers.linear import Linear
from llmctl.layers.rotary import RotaryEmbedding
from llmctl.models.base import ModelContext
from llmctl.ops import Ops


@dataclass(frozen=True)
class MLASpec:
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def cache_head_size(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


class MLAAttention(EngineModule):
    def __init__(self, hidden_size: int, num_heads: int, mla: MLASpec, scale: float, bias: bool, eps: float,
                 ctx: ModelContext, rotary: RotaryEmbedding) -> None:
        super().__init__()
        kw = dict(dtype=ctx.dtype, device=ctx.device)
        self.num_heads, self.mla = num_heads, mla
        qk_head = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank:
            self.q_a_proj = Linear(hidden_size, mla.q_lora_rank, bias=bias, **kw)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, 1e-6, ctx.ops, **kw)
            self.q_b_proj = Linear(mla.q_lora_rank, num_heads * qk_head, bias=False, **kw)
        else:
            self.q_proj = Linear(hidden_size, num_heads * qk_head, bias=False, **kw)
        self.kv_a_proj_with_mqa = Linear(hidden_size, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=bias, **kw)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, 1e-6, ctx.ops, **kw)
        self.kv_b_proj = Linear(mla.kv_lora_rank, num_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False,
                                **kw)
        self.kv_b_proj.dequantize_after_load = True  # split into w_uk / w_uv below, never run as a layer
        self.o_proj = Linear(num_heads * mla.v_head_dim, hidden_size, bias=bias, **kw)
        self.rotary = rotary
        self.attn = Attention(num_heads, 1, mla.cache_head_size, scale, ctx.attention)
        self.w_uk: torch.Tensor | None = None  # [H, nope, rank], taken from kv_b_proj once loaded
        self.w_uv: torch.Tensor | None = None  # [H, v, rank]

    def bind_ops(self, ops: Ops) -> None:
        """Runs before the children's (a parent comes first in ``modules()``): keep the absorbed halves of
        ``kv_b_proj`` and release the projection, which is never called as a layer."""
        m = self.mla
        w = self.kv_b_proj.weight.detach().view(self.num_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        self.w_uk = w[:, : m.qk_nope_head_dim].clone()
        self.w_uv = w[:, m.qk_nope_head_dim:].clone()
        self.kv_b_proj.release_weight()

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.w_uk is None or self.w_uv is None:  # used before load_model bound the ops (tests)
            self.bind_ops(None)  # type: ignore[arg-type]
        assert self.w_uk is not None and self.w_uv is not None
        return self.w_uk, self.w_uv

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        m, t, h = self.mla, hidden.shape[0], self.num_heads
        w_uk, w_uv = self._absorbed()
        if m.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        else:
            q = self.q_proj(hidden)
        q_nope, q_pe = q.view(t, h, -1).split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(hidden).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        c = self.kv_a_layernorm(c)
        q_pe, k_pe = self.rotary(positions, q_pe.contiguous(), k_pe.reshape(t, 1, m.qk_rope_head_dim).contiguous())
        q_latent = torch.einsum("thn,hnr->thr", q_nope, w_uk)
        query = torch.cat((q_latent, q_pe), dim=-1)
        key = torch.cat((c.unsqueeze(1), k_pe), dim=-1)
        value = torch.cat((c.unsqueeze(1), torch.zeros_like(k_pe)), dim=-1)
        out = self.attn(query, key, value, kv_cache, metadata).view(t, h, m.cache_head_size)[..., : m.kv_lora_rank]
        return self.o_proj(torch.einsum("thr,hvr->thv", out, w_uv).reshape(t, h * m.v_head_dim))
