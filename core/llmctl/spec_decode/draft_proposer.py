"""A smaller model that shares the target's tokenizer drafts the next tokens greedily.

The draft keeps its own KV cache with the target's block geometry and reuses the target's block tables: a
request's draft KV lives in the same block ids as its target KV, in the draft's own tensors, so the block
pool, prefix sharing and rollback need nothing extra. Before drafting past a request's known tokens the
proposer asks the KV manager for the blocks those draft positions need (released again by the next step's
trim when the drafts are rejected).

Per request the proposer remembers which positions of its draft cache are valid: after a verification step
the accepted drafts' KV is still right, the rest is recomputed. A preempted request starts over, and a new
request's draft computes its whole prompt (the draft does not read the prefix cache).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from llmctl.engine.model_runner import ModelRunner
from llmctl.engine.request import Request
from llmctl.engine.scheduler import ScheduledRequest, SchedulerOutput
from llmctl.kv.manager import KVCacheManager
from llmctl.sampling_params import SamplingParams
from llmctl.spec_decode.config import SpeculativeConfig

logger = logging.getLogger(__name__)

_PLAIN = SamplingParams()


@dataclass
class _DraftView:
    """A request as the draft runner sees it: the known tokens plus the drafts so far."""

    num_computed_tokens: int
    all_token_ids: list[int]
    block_ids: list[int]
    request_id: str
    sampling_params: SamplingParams = field(default_factory=lambda: _PLAIN)
    spec_token_ids: list[int] = field(default_factory=list)
    pooling_params: None = None  # what the model runner reads of every request: a draft pools nothing,
    token_type_ids: None = None  # has no segment ids
    lora: None = None  # runs no adapter
    mm_features: tuple = ()  # and sees no images (multimodal targets refuse draft models)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.all_token_ids)


@dataclass
class _DraftState:
    num_tokens: int  # the request's token count when these drafts were made
    drafts: list[int]
    num_preemptions: int


class DraftModelProposer:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device, kv: KVCacheManager) -> None:
        self.runner = ModelRunner(model, kv_caches, block_size, device)
        self.kv = kv
        self._state: dict[str, _DraftState] = {}

    def _valid_prefix(self, req: Request) -> int:
        """Positions of the draft cache that hold the draft's KV for this request's current tokens."""
        st = self._state.get(req.request_id)
        if st is None or st.num_preemptions != req.num_preemptions:
            return 0
        matched = 0
        for j, d in enumerate(st.drafts[:-1]):  # the last draft was never fed
            if st.num_tokens + j >= req.num_tokens or req.all_token_ids[st.num_tokens + j] != d:
                break
            matched += 1
        return min(st.num_tokens + matched, req.num_tokens - 1)

    def propose(self, items: list[tuple[Request, int]]) -> list[list[int]]:
        """Up to ``k`` greedy draft tokens for each (request, k); fewer where no KV block is free."""
        live = {req.request_id for req, _ in items}
        for rid in [r for r in self._state if r not in live]:
            del self._state[rid]
        out: list[list[int]] = [[] for _ in items]
        views: list[tuple[int, _DraftView, int]] = []
        for i, (req, k) in enumerate(items):
            if k <= 0:
                continue
            if k > 1 and not self.kv.allocate(req.request_id, req.num_computed_tokens, k):
                k = 1  # the next token's block is already there; drafting further needs blocks we lack
            start = self._valid_prefix(req)
            views.append((i, _DraftView(start, list(req.all_token_ids), req.block_ids, req.request_id), k))
        if not views:
            return out
        active = views
        step = 0
        while active:
            sched = SchedulerOutput([ScheduledRequest(v, v.num_tokens - v.num_computed_tokens) for _, v, _ in active])
            batch = self.runner.prepare(sched)
            tokens = self.runner.execute(batch).sample_logits.argmax(dim=-1).tolist()
            step += 1
            still = []
            for (i, v, k), t in zip(active, tokens, strict=True):
                v.num_computed_tokens = v.num_tokens
                v.all_token_ids.append(t)
                out[i].append(t)
                if step < k:
                    still.append((i, v, k))
            active = still
        for i, (req, _) in enumerate(items):
            if out[i]:
                self._state[req.request_id] = _DraftState(req.num_tokens, out[i], req.num_preemptions)
        return out


def resolve_draft_model(config: Any, model_config: Any, trust_remote_code: bool) -> Any:
    """The draft checkpoint's source, refused unless its vocabulary is the target's and its context covers
    max_model_len (read from its config, before anything is loaded or allocated)."""
    from llmctl.loader.source import resolve_model

    source = resolve_model(config.model, None, trust_remote_code)
    cfg = getattr(source.hf_config, "text_config", None) or source.hf_config
    if cfg.vocab_size != model_config.vocab_size:
        raise ValueError(f"speculative_config.model: the draft's vocabulary ({cfg.vocab_size} tokens) differs from "
                         f"the target's ({model_config.vocab_size}); the draft must share the target's tokenizer")
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and limit < model_config.max_model_len:
        raise ValueError(f"speculative_config.model: the draft's context ({limit}) is shorter than max_model_len "
                         f"({model_config.max_model_len})")
    return source


def load_draft_proposer(source: Any, core: Any) -> DraftModelProposer:
    """The draft model on the target's platform, dtype and block geometry."""
    from llmctl.engine.core import _kv_geometry
    from llmctl.loader.model_loader import load_model
    from llmctl.models.base import ModelContext
    from llmctl.plugins import get_plugin_manager
    from llmctl.quantization import resolve_quant_config

    plugins = get_plugin_manager()
    dtype = core.model_config.dtype
    head_size, _, sliding_window = _kv_geometry(source.hf_config)
    features = frozenset({"chunked_prefill", "prefix_caching"} | ({"sliding_window"} if sliding_window else set()))
    attention = plugins.select_attention_backend(core.platform, dtype, head_size, core.args.block_size, features)
    ctx = ModelContext(ops=core.ops, attention=attention, dtype=dtype, device=core.device,
                       quant=resolve_quant_config(None, source))
    model = load_model(source, ctx, plugins.registry, core.platform.name)
    spec = model.kv_cache_spec()
    num_blocks = core.cache_config.num_blocks
    shape = attention.kv_cache_shape(num_blocks, core.args.block_size, spec.num_kv_heads, spec.head_size)
    caches = [torch.empty(shape, dtype=dtype, device=core.device) for _ in range(spec.num_layers)]
    core.kv.add_reached_listener(core.platform.prepare_kv_cache(caches, num_blocks))
    proposer = DraftModelProposer(model, caches, core.args.block_size, core.device, core.kv)
    # The draft's steps are decodes (after a first chunk of the tokens the target accepted, at most
    # 1 + num_speculative_tokens long): laid out one row per token, they replay a captured decode step.
    runner = proposer.runner
    runner.max_flat_query_len = 1 + SpeculativeConfig.parse(core.args.speculative_config).num_speculative_tokens
    if core.args.enforce_eager or core.world.size > 1 or not getattr(attention, "supports_graph_capture", False):
        graphs = "off"
    else:
        graphs = runner.capture_decode_graphs(core.platform, core.args.max_num_seqs * runner.max_flat_query_len,
                                              core.model_config.max_model_len)
    logger.info("llmctl draft model: %d layers, decode graphs %s", spec.num_layers, graphs)
    return proposer
