"""EAGLE-3 (``speculative_config={"method": "eagle3", "model": DIR, "num_speculative_tokens": k}``): a one-layer
head that drafts from three of the target's intermediate hidden states instead of its last one.

Checkpoint layout (as EAGLE-3 heads are published): a one-layer Llama ``config.json`` with ``draft_vocab_size``;
``fc.weight`` [H, 3H], ``midlayer.*`` (``input_layernorm``, ``hidden_norm``, q/k/v projections over 2H inputs,
``o_proj``, ``post_attention_layernorm``, the MLP), ``norm.weight``, ``lm_head.weight`` [draft_vocab, H],
``d2t`` (per draft id, the offset to its target id) and optionally ``t2d`` (unused) and ``embed_tokens.weight``
(otherwise the target's embedding is shared).

At position ``p`` the head reads ``fc(concat(a1[p], a2[p], a3[p]))``, the fused residual streams entering the
target's auxiliary layers (``eagle_aux_hidden_state_layer_ids`` from the head's config, else layers 2, L//2 and
L-3 of the target's L), together with the embedding of ``x[p+1]``: the normed embedding and the normed feature
are concatenated for attention, the feature itself is the residual. The head's output before its final norm is
the feature of the next draft (no ``fc`` then, it is already H wide); after the norm, the head's own LM head
gives draft-vocabulary logits that ``d2t`` maps to target ids. The batching, KV cache and per-request state are
the EAGLE-1 proposer's (:mod:`llmctl.spec_decode.eagle`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from llmctl.attention import AttentionMetadata
from llmctl.layers._module import EngineModule
from llmctl.layers.fused_loading import STACKED_QKV_GATE_UP, load_fused, missing_tensors
from llmctl.layers.linear import Linear
from llmctl.models.base import KVCacheSpec, ModelContext
from llmctl.spec_decode.eagle import EagleProposer, build_head_proposer, checkpoint_tensor_names, target_embeddings

_FIELD = "speculative_config.model"
_IGNORED = ("t2d",)  # the target-to-draft mask: only training uses it


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """The layers EAGLE-3 heads are trained on unless their config names others."""
    return (2, num_layers // 2, num_layers - 3)


def aux_layers_of(head_cfg: Any, num_layers: int) -> tuple[int, ...]:
    eagle_cfg = getattr(head_cfg, "eagle_config", None) or {}
    ids = getattr(head_cfg, "eagle_aux_hidden_state_layer_ids", None) or \
        (eagle_cfg.get("eagle_aux_hidden_state_layer_ids") if isinstance(eagle_cfg, dict) else None)
    layers = tuple(int(i) for i in ids) if ids else default_aux_layers(num_layers)
    if len(layers) != 3 or not all(0 <= i < num_layers for i in layers):
        raise ValueError(f"{_FIELD}: the EAGLE-3 head reads the target's layers {list(layers)}, but it needs three "
                         f"layer ids in [0, {num_layers}) (the target has {num_layers} layers); set "
                         f"eagle_aux_hidden_state_layer_ids in the head's config.json")
    return layers


class Eagle3Head(EngineModule):
    def __init__(self, cfg: Any, ctx: ModelContext, target: torch.nn.Module) -> None:
        super().__init__()
        from llmctl.layers import GatedMLP, RMSNorm, get_rope
        from llmctl.layers.parallel import QKVParallelLinear, VocabParallelEmbedding
        from llmctl.models.llama import LlamaAttention, _head_dim

        kw = dict(dtype=ctx.dtype, device=ctx.device)
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.config = cfg
        self.hidden_size = hidden
        self.vocab_size = cfg.vocab_size
        self.draft_vocab_size = int(getattr(cfg, "draft_vocab_size", None) or cfg.vocab_size)
        self.norm_before_residual = bool(getattr(cfg, "norm_before_residual", False))
        self.fc = Linear(3 * hidden, hidden, bias=False, **kw)
        self.input_layernorm = RMSNorm(hidden, eps, ctx.ops, **kw)
        self.hidden_norm = RMSNorm(hidden, eps, ctx.ops, **kw)
        # the head is a Llama layer whatever its config's model_type says (heads for Qwen targets copy theirs)
        llama_cfg = copy.copy(cfg)
        llama_cfg.model_type = "llama"
        self.self_attn = LlamaAttention(llama_cfg, ctx, None, get_rope(cfg, _head_dim(cfg), ctx.ops, ctx.device))
        attn = self.self_attn
        total_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        # q/k/v read the normed embedding and the normed feature side by side
        attn.qkv_proj = QKVParallelLinear(2 * hidden, cfg.num_attention_heads, total_kv, attn.head_dim,
                                          bias=bool(getattr(cfg, "attention_bias", False)), tp=ctx.tp, **kw)
        self.post_attention_layernorm = RMSNorm(hidden, eps, ctx.ops, **kw)
        self.mlp = GatedMLP(hidden, cfg.intermediate_size, getattr(cfg, "hidden_act", "silu"), ctx.ops,
                            bias=bool(getattr(cfg, "mlp_bias", False)), tp=ctx.tp, **kw)
        self.norm = RMSNorm(hidden, eps, ctx.ops, **kw)
        # a head without lm_head.weight (its draft vocabulary is then the target's) uses the target's LM head
        self.lm_head = Linear(hidden, self.draft_vocab_size, bias=False, **kw) \
            if getattr(cfg, "eagle3_own_lm_head", True) else None
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, hidden, tp=ctx.tp, **kw) \
            if getattr(cfg, "eagle3_own_embedding", False) else None
        # draft id -> target id offset; all zeros (the identity) when the vocabularies are the same
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.long, device=ctx.device))
        self._target = (target,)  # shared, not a submodule

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata, features: torch.Tensor) -> torch.Tensor:
        """``features``: the target's three auxiliary states (3H wide, fused by ``fc``) after a target step, or
        the head's own previous output (H wide) while drafting. Returns the output before the final norm."""
        embed = self.embed_tokens if self.embed_tokens is not None else target_embeddings(self._target[0])
        embeds = embed(input_ids)
        features = features.to(embeds.dtype)
        if features.shape[-1] != self.hidden_size:
            features = self.fc(features)
        if self.norm_before_residual:
            residual = normed = self.hidden_norm(features)
        else:
            residual, normed = features, self.hidden_norm(features)
        hidden = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        hidden = self.self_attn(positions, hidden, kv_caches[0], metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden) + residual

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary."""
        normed = self.norm(hidden)
        return self.lm_head(normed) if self.lm_head is not None else self._target[0].compute_logits(normed)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the target's vocabulary: ids outside the draft vocabulary get -inf."""
        draft = self.draft_logits(hidden)
        ids = torch.arange(self.draft_vocab_size, device=draft.device) + self.d2t
        out = draft.new_full((draft.shape[0], self.vocab_size), float("-inf"))
        out[:, ids] = draft
        return out

    def draft_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy target ids, without building target-vocabulary rows."""
        best = self.draft_logits(hidden).argmax(dim=-1)
        return best + self.d2t[best]

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(num_layers=1, num_kv_heads=self.self_attn.num_kv_heads, head_size=self.self_attn.head_dim)

    @torch.no_grad()
    def load_weights(self, weights: Any) -> None:
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        expected = {"fc.weight": (self.hidden_size, 3 * self.hidden_size),
                    "lm_head.weight": (self.draft_vocab_size, self.hidden_size)}
        for proj in ("q_proj", "k_proj", "v_proj"):
            expected[f"self_attn.{proj}.weight"] = (-1, 2 * self.hidden_size)
        kept: list[tuple[str, torch.Tensor]] = []
        has_d2t = False
        for raw, tensor in weights:
            name = raw.removeprefix("model.").replace("midlayer.", "").replace("layers.0.", "")
            if name in _IGNORED or "rotary_emb" in name:
                continue
            want = expected.get(name)
            if want is not None and (tensor.dim() != 2 or (want[0] != -1 and tensor.shape[0] != want[0])
                                     or tensor.shape[1] != want[1]):
                raise ValueError(f"{_FIELD}: tensor {raw} has shape {list(tensor.shape)}, expected "
                                 f"[{'*' if want[0] == -1 else want[0]}, {want[1]}] for a target of hidden size "
                                 f"{self.hidden_size} (fc fuses three target layers; q/k/v read 2 x hidden)")
            if name == "d2t":
                if tuple(tensor.shape) != (self.draft_vocab_size,):
                    raise ValueError(f"{_FIELD}: tensor {raw} has shape {list(tensor.shape)}, expected "
                                     f"[{self.draft_vocab_size}] (draft_vocab_size)")
                ids = torch.arange(self.draft_vocab_size) + tensor.to(torch.long)
                if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
                    raise ValueError(f"{_FIELD}: tensor {raw} maps draft ids outside the target's vocabulary "
                                     f"[0, {self.vocab_size})")
                self.d2t.copy_(tensor.to(torch.long))
                has_d2t = True
                continue
            kept.append((name, tensor))
        if not has_d2t and self.draft_vocab_size != self.vocab_size:
            raise ValueError(f"{_FIELD}: the EAGLE-3 checkpoint lacks tensor d2t, which maps its "
                             f"{self.draft_vocab_size} draft ids to the target's {self.vocab_size} "
                             f"(draft_vocab_size differs from vocab_size)")
        loaded = load_fused(kept, params, modules, STACKED_QKV_GATE_UP,
                            lambda name: f"{_FIELD}: tensor {name} has no place in an EAGLE-3 head")
        missing = missing_tensors(params, modules, loaded)
        if missing:
            raise ValueError(f"{_FIELD}: the EAGLE-3 checkpoint lacks {len(missing)} tensor(s), e.g. "
                             f"{', '.join(missing[:5])}")


def resolve_eagle3_head(config: Any, model_config: Any, trust_remote_code: bool) -> Any:
    """The head checkpoint's source, refused unless its config fits the target."""
    from llmctl.loader.source import resolve_model

    source = resolve_model(config.model, None, trust_remote_code)
    cfg = getattr(source.hf_config, "text_config", None) or source.hf_config
    target = getattr(model_config.hf_config, "text_config", None) or model_config.hf_config
    sizes = {"hidden_size": cfg.hidden_size, "target_hidden_size": getattr(cfg, "target_hidden_size", None)}
    for key, size in sizes.items():
        if size is not None and size != target.hidden_size:
            raise ValueError(f"{_FIELD}: the EAGLE-3 head's {key} ({size}) differs from the target's hidden size "
                             f"({target.hidden_size})")
    if cfg.vocab_size != model_config.vocab_size:
        raise ValueError(f"{_FIELD}: the EAGLE-3 head's vocab_size ({cfg.vocab_size}) differs from the target's "
                         f"({model_config.vocab_size})")
    draft_vocab = getattr(cfg, "draft_vocab_size", None) or cfg.vocab_size
    if not 0 < draft_vocab <= cfg.vocab_size:
        raise ValueError(f"{_FIELD}: the EAGLE-3 head's draft_vocab_size ({draft_vocab}) must be in "
                         f"[1, {cfg.vocab_size}]")
    aux_layers_of(cfg, target.num_hidden_layers)
    return source


def load_eagle3_proposer(source: Any, core: Any) -> EagleProposer:
    """The head on the target's platform, dtype and block geometry; turns on the target's auxiliary outputs."""
    inner = getattr(core.model, "model", None)
    if not hasattr(inner, "aux_hidden_state_layers"):
        raise ValueError(f"speculative_config.method: eagle3 needs a Llama-family target that exposes its "
                         f"intermediate hidden states; {type(core.model).__name__} does not")
    names = checkpoint_tensor_names(source)
    cfg = source.hf_config
    if core.tp.size > 1:
        raise ValueError("speculative_config.method: eagle3 runs its head on one device; it is not supported with "
                         f"tensor_parallel_size {core.tp.size}")
    pp = getattr(core, "pp", None)
    if pp is not None and pp.size > 1:
        raise ValueError("speculative_config.method: eagle3 reads three target layers that pipeline stages split; "
                         f"it is not supported with pipeline_parallel_size {pp.size}")
    cfg.eagle3_own_embedding = "embed_tokens.weight" in names or "model.embed_tokens.weight" in names
    cfg.eagle3_own_lm_head = "lm_head.weight" in names or "model.lm_head.weight" in names
    draft_vocab = getattr(cfg, "draft_vocab_size", None) or cfg.vocab_size
    if not cfg.eagle3_own_lm_head and draft_vocab != cfg.vocab_size:
        raise ValueError(f"{_FIELD}: the EAGLE-3 checkpoint lacks tensor lm_head.weight, which a draft vocabulary "
                         f"of {draft_vocab} tokens (not the target's {cfg.vocab_size}) needs")
    proposer = build_head_proposer(source, core, lambda c, x: Eagle3Head(c, x, core.model))
    inner.aux_hidden_state_layers = aux_layers_of(cfg, len(inner.layers))
    return proposer
