"""BART (``BartForConditionalGeneration``): an encoder-decoder whose cross-attention keys/values live in the
paged KV cache (layout and step split in :mod:`llmctl.layers.cross_attention`).

The encoder runs once per request, in plain torch (bidirectional attention over the request's own rows, so it
needs no paged kernel), and writes every decoder layer's cross keys/values into the request's first blocks. The
decoder is BART's post-LayerNorm stack with learned positions offset by 2, paged causal self-attention and
paged cross-attention; the head is tied to the shared embedding, plus ``final_logits_bias``. Module names follow
transformers' so checkpoint tensors load by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.attention import AttentionMetadata
from llmctl.layers import Attention, Linear, VocabEmbedding
from llmctl.layers._module import EngineModule
from llmctl.layers._params import copy_checked, empty_param
from llmctl.layers.cross_attention import EncoderDecoderStep, cross_attend, padded_encoder_len, split_step
from llmctl.models.base import KVCacheSpec, ModelContext
from llmctl.models.bert import LayerNorm, _activation

POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding: the table has two extra leading rows


class _Projections(EngineModule):
    """q/k/v/out projections under transformers' names (``self_attn.q_proj``...)."""

    def __init__(self, d: int, kw: dict) -> None:
        super().__init__()
        self.q_proj = Linear(d, d, bias=True, **kw)
        self.k_proj = Linear(d, d, bias=True, **kw)
        self.v_proj = Linear(d, d, bias=True, **kw)
        self.out_proj = Linear(d, d, bias=True, **kw)


class _EncoderLayer(EngineModule):
    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.encoder_attention_heads
        self.head_dim = d // self.num_heads
        self.self_attn = _Projections(d, kw)
        self.self_attn_layer_norm = LayerNorm(d, 1e-5, **kw)
        self.fc1 = Linear(d, cfg.encoder_ffn_dim, bias=True, **kw)
        self.fc2 = Linear(cfg.encoder_ffn_dim, d, bias=True, **kw)
        self.final_layer_norm = LayerNorm(d, 1e-5, **kw)
        self.act = _activation(cfg.activation_function)

    def forward(self, x: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
        """``x`` [N, d]: the encoder rows of several sequences end to end; ``runs`` (start, length) of each."""
        a = self.self_attn
        q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
        out = torch.empty_like(q)
        h, dh = self.num_heads, self.head_dim
        for start, n in runs:
            qs, ks, vs = (t[start:start + n].view(n, h, dh).transpose(0, 1) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=dh ** -0.5)
            out[start:start + n] = o.transpose(0, 1).reshape(n, -1)
        x = self.self_attn_layer_norm(x + a.out_proj(out))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class _DecoderLayer(EngineModule):
    def __init__(self, cfg: Any, ctx: ModelContext, kw: dict) -> None:
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.decoder_attention_heads
        self.head_dim = d // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = ctx.attention
        self.self_attn = _Projections(d, kw)
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, self.scale, ctx.attention)
        self.self_attn_layer_norm = LayerNorm(d, 1e-5, **kw)
        self.encoder_attn = _Projections(d, kw)
        self.encoder_attn_layer_norm = LayerNorm(d, 1e-5, **kw)
        self.fc1 = Linear(d, cfg.decoder_ffn_dim, bias=True, **kw)
        self.fc2 = Linear(cfg.decoder_ffn_dim, d, bias=True, **kw)
        self.final_layer_norm = LayerNorm(d, 1e-5, **kw)
        self.act = _activation(cfg.activation_function)

    def write_cross_kv(self, encoded: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
        shape = (encoded.shape[0], self.num_heads, self.head_dim)
        a = self.encoder_attn
        self.backend.write_kv(a.k_proj(encoded).view(shape), a.v_proj(encoded).view(shape), kv_cache, slots)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, step: EncoderDecoderStep) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, self.head_dim)
        a = self.self_attn
        attn = self.attn(a.q_proj(x).view(shape), a.k_proj(x).view(shape), a.v_proj(x).view(shape), kv_cache,
                         step.self_metadata)
        x = self.self_attn_layer_norm(x + a.out_proj(attn))
        c = self.encoder_attn
        cross = cross_attend(self.backend, c.q_proj(x).view(shape), kv_cache, step.cross_metadata, self.scale)
        x = self.encoder_attn_layer_norm(x + c.out_proj(cross))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class _Stack(EngineModule):
    """The parts an encoder and a decoder share: learned positions and the embedding LayerNorm."""

    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__()
        self.embed_positions = VocabEmbedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.d_model, **kw)
        self.layernorm_embedding = LayerNorm(cfg.d_model, 1e-5, **kw)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.layernorm_embedding(tokens + self.embed_positions(positions + POSITION_OFFSET))


class _Encoder(_Stack):
    def __init__(self, cfg: Any, kw: dict) -> None:
        super().__init__(cfg, kw)
        self.layers = nn.ModuleList(_EncoderLayer(cfg, kw) for _ in range(cfg.encoder_layers))


class _Decoder(_Stack):
    def __init__(self, cfg: Any, ctx: ModelContext, kw: dict) -> None:
        super().__init__(cfg, kw)
        self.layers = nn.ModuleList(_DecoderLayer(cfg, ctx, kw) for _ in range(cfg.decoder_layers))


class _BartModel(EngineModule):
    def __init__(self, cfg: Any, ctx: ModelContext, kw: dict) -> None:
        super().__init__()
        self.shared = VocabEmbedding(cfg.vocab_size, cfg.d_model, **kw)
        self.encoder = _Encoder(cfg, kw)
        self.decoder = _Decoder(cfg, ctx, kw)


class BartForConditionalGeneration(EngineModule):
    is_encoder_decoder = True

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__()
        cfg = hf_config
        if cfg.d_model % cfg.decoder_attention_heads or cfg.d_model % cfg.encoder_attention_heads:
            raise ValueError(f"model: d_model {cfg.d_model} is not divisible by the attention heads")
        self.config = cfg
        kw = dict(dtype=ctx.dtype, device=ctx.device)
        self.model = _BartModel(cfg, ctx, kw)
        self.embed_scale = math.sqrt(cfg.d_model) if getattr(cfg, "scale_embedding", False) else 1.0
        self.tied = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = None if self.tied else Linear(cfg.d_model, cfg.vocab_size, bias=False, **kw)
        self.final_logits_bias = empty_param(1, cfg.vocab_size, **kw)
        self.block_size: int | None = None  # the KV block size, from the first step's metadata

    @staticmethod
    def max_encoder_len(hf_config: Any) -> int:
        return hf_config.max_position_embeddings

    @staticmethod
    def max_decoder_len(hf_config: Any) -> int:
        return hf_config.max_position_embeddings

    @staticmethod
    def engine_context_len(hf_config: Any, block_size: int) -> int:
        """The engine's ``max_model_len``: the longest encoder input, padded to a block, then the decoder start
        token and as many generated tokens as the decoder has positions (each side has its own position table;
        the last generated token is never fed back)."""
        n = hf_config.max_position_embeddings
        return padded_encoder_len(n, block_size) + 1 + n

    def kv_cache_spec(self) -> KVCacheSpec:
        layer = self.model.decoder.layers[0]
        return KVCacheSpec(num_layers=len(self.model.decoder.layers), num_kv_heads=layer.num_heads,
                           head_size=layer.head_dim)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.shared(ids) * self.embed_scale

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata, encoder_lens: list[int] | None = None) -> torch.Tensor:
        """``encoder_lens``: each sequence's encoder length (the runner's). Without them (the start-up profiling
        pass) each sequence is read as the longest encoder it can hold, then decoder rows."""
        bs = metadata.block_size
        profiling = encoder_lens is None
        if profiling:
            encoder_lens = _profile_encoder_lens(metadata, self.config.max_position_embeddings)
        step = split_step(metadata, positions, encoder_lens, bs)
        if profiling:  # a full-length profiled sequence feeds its last token too, which real requests never do
            step.decoder_positions.clamp_(max=self.config.max_position_embeddings - 1)
        hidden = torch.zeros(input_ids.shape[0], self.config.d_model, dtype=self.final_logits_bias.dtype,
                             device=input_ids.device)
        if step.encoder_runs:
            self._encode(input_ids, positions, kv_caches, metadata, step)
        if step.self_metadata is None:
            return hidden
        dec = self.model.decoder
        x = dec.embed(self._embed(input_ids[step.decoder_rows]), step.decoder_positions)
        for layer, kv_cache in zip(dec.layers, kv_caches, strict=True):
            x = layer(x, kv_cache, step)
        hidden[step.decoder_rows] = x
        return hidden

    def _encode(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata, step: EncoderDecoderStep) -> None:
        rows = torch.cat([torch.arange(r.start, r.start + r.length) for r in step.encoder_runs]).to(input_ids.device)
        runs, at = [], 0
        for r in step.encoder_runs:
            runs.append((at, r.length))
            at += r.length
        enc = self.model.encoder
        x = enc.embed(self._embed(input_ids[rows]), positions[rows])
        for layer in enc.layers:
            x = layer(x, runs)
        slots = metadata.slot_mapping[rows]
        for layer, kv_cache in zip(self.model.decoder.layers, kv_caches, strict=True):
            layer.write_cross_kv(x, kv_cache, slots)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.shared.weight if self.lm_head is None else None
        logits = F.linear(hidden, weight) if weight is not None else self.lm_head(hidden)
        return logits + self.final_logits_bias[0]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        aliases = ["model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"]
        if self.tied:
            aliases.append("lm_head.weight")
        loaded: set[str] = set()
        for raw, tensor in weights:
            name = "model.shared.weight" if raw in aliases else raw
            if name not in params:
                raise ValueError(f"checkpoint tensor {raw} has no place in {type(self).__name__}")
            copy_checked(params[name].data, tensor, raw)
            loaded.add(name)
        if "final_logits_bias" not in loaded:  # transformers zero-initialises it; older checkpoints omit it
            params["final_logits_bias"].data.zero_()
            loaded.add("final_logits_bias")
        missing = [p for p in params if p not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}")


def _profile_encoder_lens(metadata: AttentionMetadata, max_positions: int) -> list[int]:
    lens = metadata.seq_lens_cpu or metadata.seq_lens.tolist()
    bs = metadata.block_size
    out = []
    for s in lens:
        e = min(max(s - 1, 1), max_positions)
        e = min(e, max((s - 1) // bs * bs, 1))
        out.append(e if padded_encoder_len(e, bs) <= s else 0)
    return out


ARCHITECTURES: dict[str, type] = {"BartForConditionalGeneration": BartForConditionalGeneration}
