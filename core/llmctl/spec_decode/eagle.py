"""EAGLE (``speculative_config={"method": "eagle", "model": DIR, "num_speculative_tokens": k}``): a one-layer
head drafts from the target's own last hidden states.

The head (EAGLE-1 layout, as its checkpoints store it: ``fc.*`` and ``layers.0.*``) reads, at position ``p``,
``fc(concat(embed(x[p+1]), h[p]))`` where ``h[p]`` is the target's final hidden state at ``p``, runs one Llama
decoder layer (without its input norm) over its own KV cache, and predicts ``x[p+2]`` through the target's LM
head; the target's token embedding is shared too. Further drafts feed the head its own output as the feature.

Its one-layer KV cache uses the target's block geometry and block tables, like the draft-model proposer: the
head's KV of a request lives in the same block ids as the target's. After each target step the positions the
target has just computed (``observe``) are fed to the head with their hidden states, which also yields the
first draft; ``propose`` then runs the head ``k - 1`` more times. A position the head never saw with its true
feature (a prefix-cache hit computed by another request) keeps whatever the block holds: that costs acceptance,
never correctness, since the target verifies every draft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmctl.attention import AttentionMetadata
from llmctl.engine.model_runner import BatchInputs, ModelRunner
from llmctl.engine.request import Request
from llmctl.engine.scheduler import ScheduledRequest, SchedulerOutput
from llmctl.kv.manager import KVCacheManager
from llmctl.layers._module import EngineModule
from llmctl.layers.fused_loading import STACKED_QKV_GATE_UP, load_fused, missing_tensors
from llmctl.layers.linear import Linear
from llmctl.models.base import KVCacheSpec, ModelContext
from llmctl.spec_decode.draft_proposer import _DraftView

# Tensors an EAGLE checkpoint may carry that the head takes from the target instead (or never has).
_SHARED = ("embed_tokens.weight", "lm_head.weight", "layers.0.input_layernorm.weight", "norm.weight")


class EagleHead(EngineModule):
    def __init__(self, cfg: Any, ctx: ModelContext, target: torch.nn.Module) -> None:
        super().__init__()
        from llmctl.layers import get_rope
        from llmctl.models.llama import LlamaDecoderLayer, _head_dim

        kw = dict(dtype=ctx.dtype, device=ctx.device)
        self.config = cfg
        self.fc = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=bool(getattr(cfg, "eagle_fc_bias", False)), **kw)
        rope = get_rope(cfg, _head_dim(cfg), ctx.ops, ctx.device)
        self.layers = torch.nn.ModuleList([LlamaDecoderLayer(cfg, ctx, None, rope)])
        self.layers[0].input_layernorm = None  # EAGLE-1's layer has none
        self._target = (target,)  # a tuple: shared, not a submodule (loading and casting never touch it twice)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata, features: torch.Tensor) -> torch.Tensor:
        embeds = target_embeddings(self._target[0])(input_ids)
        hidden = self.fc(torch.cat([embeds, features.to(embeds.dtype)], dim=-1))
        layer = self.layers[0]
        residual = hidden  # EAGLE-1's layer has no input norm
        hidden = layer.self_attn(positions, hidden, kv_caches[0], metadata)
        hidden, residual = layer.post_attention_layernorm(hidden, residual)
        return layer.mlp(hidden) + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._target[0].compute_logits(hidden)

    def draft_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden).argmax(dim=-1)

    def kv_cache_spec(self) -> KVCacheSpec:
        attn = self.layers[0].self_attn
        return KVCacheSpec(num_layers=1, num_kv_heads=attn.num_kv_heads, head_size=attn.head_dim)

    @torch.no_grad()
    def load_weights(self, weights: Any) -> None:
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        kept = ((name, tensor) for name, tensor in ((n.removeprefix("model."), t) for n, t in weights)
                if name not in _SHARED and "rotary_emb" not in name)
        loaded = load_fused(kept, params, modules, STACKED_QKV_GATE_UP,
                            lambda name: f"speculative_config.model: tensor {name} has no place in an EAGLE head")
        missing = missing_tensors(params, modules, loaded)
        if missing:
            raise ValueError(f"speculative_config.model: the EAGLE checkpoint lacks {len(missing)} tensor(s), e.g. "
                             f"{', '.join(missing[:5])}")


def target_embeddings(target: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(target, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if embed is None:
        raise ValueError(f"speculative_config.method: eagle needs a target with a token embedding "
                         f"(model.embed_tokens); {type(target).__name__} has none")
    return embed


@dataclass
class _HeadState:
    num_preemptions: int
    done: int  # positions [0, done) of the head's cache hold its KV for the request's true tokens
    next_token: int | None = None  # the first draft, read from the last ingested position
    next_feature: torch.Tensor | None = None  # the head's output there, the feature of the next draft
    num_tokens: int = 0  # the request's token count when next_token was read


class EagleProposer:
    wants_hidden = True

    def __init__(self, head: Any, kv_caches: list[torch.Tensor], block_size: int, device: torch.device,
                 kv: KVCacheManager) -> None:
        self.head = head
        self.kv_caches = kv_caches
        self.runner = ModelRunner(head, kv_caches, block_size, device)  # builds the head's batches
        self.kv = kv
        self._state: dict[str, _HeadState] = {}

    def _run(self, views: list[tuple[_DraftView, int]], features: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """One head forward over ``(view, num_new)`` chunks: the output at each chunk's last row and its argmax."""
        batch: BatchInputs = self.runner.prepare(SchedulerOutput([ScheduledRequest(v, n) for v, n in views]))
        with torch.inference_mode():
            hidden = self.head(batch.input_ids, batch.positions, self.kv_caches, batch.metadata, features)
            last = hidden[batch.logits_indices]
            tokens = self.head.draft_tokens(last).tolist()
        return last, tokens

    def observe(self, sched: SchedulerOutput, batch: BatchInputs, hidden: torch.Tensor | None) -> None:
        """Feed the head the positions the target computed this step, with the target's hidden states there."""
        if hidden is None:
            return
        offset = 0
        views: list[tuple[_DraftView, int]] = []
        parts: list[torch.Tensor] = []
        owners: list[tuple[Request, int]] = []
        md = batch.metadata
        scheduled = {s.request.request_id for s in sched.scheduled}
        for rid in [r for r in self._state if r not in scheduled]:
            del self._state[rid]  # a request back later re-reads from where its next chunk starts
        if batch.flat_chunks is not None:  # one row per token: the chunks are the batch's, not the metadata's
            query_lens = [n for _, n in batch.flat_chunks]
            seq_lens = [start + n for start, n in batch.flat_chunks]
        else:
            query_lens = md.query_lens_cpu or [s.num_new_tokens for s in sched.scheduled]
            seq_lens = md.seq_lens_cpu or []
        for i, item in enumerate(sched.scheduled):
            req, n = item.request, query_lens[i]
            start = (seq_lens[i] if seq_lens else req.num_computed_tokens) - n
            row0, offset = offset, offset + n
            if req.finished or req.pooling_params is not None:
                self._state.pop(req.request_id, None)
                continue
            st = self._state.get(req.request_id)
            if st is None or st.num_preemptions != req.num_preemptions or st.done < start:
                st = _HeadState(req.num_preemptions, start)
                self._state[req.request_id] = st
            lo = max(st.done, start)
            hi = min(req.num_computed_tokens, req.num_tokens - 1, start + n)
            if hi <= lo:
                continue
            shifted = req.all_token_ids[1:hi + 1]
            views.append((_DraftView(lo, shifted, req.block_ids, req.request_id), hi - lo))
            parts.append(hidden[row0 + lo - start:row0 + hi - start])
            owners.append((req, hi))
        if not views:
            return
        last, tokens = self._run(views, torch.cat(parts))
        for j, (req, hi) in enumerate(owners):
            st = self._state[req.request_id]
            st.done = hi
            if hi == req.num_tokens - 1:  # caught up: the head has read the newest token
                st.next_token, st.next_feature, st.num_tokens = tokens[j], last[j:j + 1], req.num_tokens
            else:
                st.next_token = st.next_feature = None

    def propose(self, items: list[tuple[Request, int]]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in items]
        active: list[tuple[int, Request, int, list[int]]] = []
        features: list[torch.Tensor] = []
        for i, (req, k) in enumerate(items):
            st = self._state.get(req.request_id)
            if k <= 0 or st is None or st.next_token is None or st.num_tokens != req.num_tokens:
                continue
            out[i].append(st.next_token)
            if k > 1 and not self.kv.allocate(req.request_id, req.num_computed_tokens, k):
                k = 1  # further drafts need blocks the pool does not have
            if k > 1:
                active.append((i, req, k, req.all_token_ids[1:] + [st.next_token]))
                features.append(st.next_feature)  # type: ignore[arg-type]
        feats = torch.cat(features) if features else None
        while active:
            views = [(_DraftView(len(toks) - 1, toks, req.block_ids, req.request_id), 1) for _, req, _, toks in active]
            last, tokens = self._run(views, feats)  # type: ignore[arg-type]
            still, keep = [], []
            for j, ((i, req, k, toks), t) in enumerate(zip(active, tokens, strict=True)):
                out[i].append(t)
                toks.append(t)
                if len(out[i]) < k:
                    still.append((i, req, k, toks))
                    keep.append(j)
            active = still
            feats = last[keep] if keep else None
        return out


def resolve_eagle_head(config: Any, model_config: Any, trust_remote_code: bool) -> Any:
    """The head checkpoint's source, refused unless it fits the target (checked from its config)."""
    from llmctl.loader.source import resolve_model

    source = resolve_model(config.model, None, trust_remote_code)
    cfg = getattr(source.hf_config, "text_config", None) or source.hf_config
    target = getattr(model_config.hf_config, "text_config", None) or model_config.hf_config
    if cfg.hidden_size != target.hidden_size:
        raise ValueError(f"speculative_config.model: the EAGLE head's hidden size ({cfg.hidden_size}) differs from "
                         f"the target's ({target.hidden_size})")
    if cfg.vocab_size != model_config.vocab_size:
        raise ValueError(f"speculative_config.model: the EAGLE head's vocabulary ({cfg.vocab_size} tokens) differs "
                         f"from the target's ({model_config.vocab_size})")
    return source


def checkpoint_tensor_names(source: Any) -> set[str]:
    """The tensor names of a head's safetensors files (optional tensors decide the head's shape)."""
    from safetensors import safe_open

    from llmctl.loader.weights import safetensors_files

    names: set[str] = set()
    for path in safetensors_files(source.local_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names.update(f.keys())
    return names


def build_head_proposer(source: Any, core: Any, make_head: Any) -> EagleProposer:
    """Load a draft head (``make_head(config, ctx)``) on the target's platform, dtype and block geometry, with
    its own one-layer KV cache of the target's block count; shared by the EAGLE and EAGLE-3 heads."""
    from llmctl.engine.core import _kv_geometry
    from llmctl.loader.model_loader import load_model
    from llmctl.plugins import get_plugin_manager

    plugins = get_plugin_manager()
    dtype = core.model_config.dtype
    head_size, _, _ = _kv_geometry(source.hf_config)
    features = frozenset({"chunked_prefill", "prefix_caching"})
    attention = plugins.select_attention_backend(core.platform, dtype, head_size, core.args.block_size, features)
    ctx = ModelContext(ops=core.ops, attention=attention, dtype=dtype, device=core.device, quant=None)
    head = load_model(source, ctx, plugins.registry, core.platform.name, model_cls=make_head)
    spec = head.kv_cache_spec()
    num_blocks = core.cache_config.num_blocks
    shape = attention.kv_cache_shape(num_blocks, core.args.block_size, spec.num_kv_heads, spec.head_size)
    caches = [torch.empty(shape, dtype=dtype, device=core.device)]
    core.kv.add_reached_listener(core.platform.prepare_kv_cache(caches, num_blocks))
    return EagleProposer(head, caches, core.args.block_size, core.device, core.kv)


def load_eagle_proposer(source: Any, core: Any) -> EagleProposer:
    """The head on the target's platform, dtype and block geometry, sharing the target's embedding and LM head."""
    names = checkpoint_tensor_names(source)
    source.hf_config.eagle_fc_bias = "fc.bias" in names or "model.fc.bias" in names
    return build_head_proposer(source, core, lambda c, x: EagleHead(c, x, core.model))

