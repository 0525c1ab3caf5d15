"""Any causal LM transformers can build, with llmctl's paged attention plugged into it.

The model is transformers' own (weights, layers, rotary, norms); only its attention calls go through transformers'
attention interface to a function registered here as ``attn_implementation="llmctl"``. That function writes the
step's keys and values into llmctl's paged KV cache and runs the selected backend over it, so batching, chunked
prefill and prefix caching work exactly as for native models. The engine's flattened batch is handed to
transformers as one row of ``num_tokens`` tokens with each token's own position; the attention mask transformers
would build is skipped, since the backend's metadata already says which keys each query sees.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from llmctl.attention import AttentionMetadata
from llmctl.layers._module import EngineModule
from llmctl.models.base import KVCacheSpec, ModelContext
from llmctl.plugins.types import FEATURE_LOGITS_SOFT_CAP, FEATURE_SLIDING_WINDOW

ATTN_IMPLEMENTATION = "llmctl"
_STEP_KWARG = "llmctl_step"  # how the step's caches and metadata reach the attention function


def _text_config(hf_config: Any) -> Any:
    return getattr(hf_config, "text_config", None) or hf_config


def llmctl_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` [1, H, T, D], ``key``/``value`` [1, Hk, T, D] ->
    ([1, T, H, D], no weights)."""
    step: _Step | None = kwargs.get(_STEP_KWARG)
    if step is None:
        raise RuntimeError("the llmctl attention implementation only runs inside the llmctl engine")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx; the transformers fallback cannot page it")
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    md, backend, kv_cache = step.metadata, step.backend, step.kv_caches[layer]
    n = md.slot_mapping.shape[0]
    backend.write_kv(k[:n], v[:n], kv_cache, md.slot_mapping)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    features: dict[str, Any] = {}
    if kwargs.get("softcap") is not None:
        features["logits_soft_cap"] = float(kwargs["softcap"])
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = backend.forward(q.contiguous(), kv_cache, md, scale, window or None, **features)
    return out.unsqueeze(0), None


def register_attention() -> None:
    """Idempotent: the attention function, and a mask function that builds no mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, llmctl_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, lambda *args, **kwargs: None)


class _Step:
    __slots__ = ("backend", "kv_caches", "metadata")

    def __init__(self, backend: Any, kv_caches: list[torch.Tensor], metadata: AttentionMetadata) -> None:
        self.backend, self.kv_caches, self.metadata = backend, kv_caches, metadata


def transformers_can_build(hf_config: Any) -> bool:
    """Whether transformers has a causal-LM class for this config (in its library, or as remote code the config
    points to)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if "AutoModelForCausalLM" in (getattr(hf_config, "auto_map", None) or {}):
        return True
    if getattr(hf_config, "model_type", None) not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    # A checkpoint saved as an encoder (BertForMaskedLM) is not a causal LM even where its type has an LM head.
    archs = getattr(hf_config, "architectures", None) or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return not archs or any(a in causal for a in archs)


class TransformersForCausalLM(EngineModule):
    """Follows :class:`llmctl.models.base.CausalLM`; transformers loads the weights itself (with its own
    checkpoint conversions), from the directory the config came from."""

    @classmethod
    def attention_features(cls, hf_config: Any) -> frozenset[str]:
        cfg = _text_config(hf_config)
        out = set()
        if getattr(cfg, "sliding_window", None):
            out.add(FEATURE_SLIDING_WINDOW)
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            out.add(FEATURE_LOGITS_SOFT_CAP)
        return frozenset(out)

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        register_attention()
        self.config = hf_config
        self.ctx = ctx
        source = getattr(hf_config, "_name_or_path", None)
        if not source:
            raise ValueError("model: the transformers fallback needs a checkpoint directory (config has no path)")
        trust = bool(ctx.extra.get("trust_remote_code", False))
        try:
            model = AutoModelForCausalLM.from_pretrained(source, config=hf_config, dtype=ctx.dtype,
                                                         attn_implementation=ATTN_IMPLEMENTATION,
                                                         trust_remote_code=trust)
        except ValueError as exc:
            if "attn_implementation" in str(exc) or "attention" in str(exc):
                arch = ", ".join(getattr(hf_config, "architectures", None) or [hf_config.model_type])
                raise ValueError(f"model: {arch} cannot run through the transformers fallback: its attention does "
                                 f"not use transformers' attention interface ({exc})") from exc
            raise
        if not getattr(model, "_supports_attention_backend", False):
            raise ValueError(f"model: {type(model).__name__} cannot run through the transformers fallback: its "
                             f"attention does not use transformers' attention interface")
        self.hf_model = model.to(ctx.device).eval()
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        cfg = _text_config(model.config)
        self._final_soft_cap = getattr(cfg, "final_logit_softcapping", None)
        self._logit_scale = float(getattr(cfg, "logit_scale", None) or 1.0)
        self._logits_scaling = float(getattr(cfg, "logits_scaling", None) or 1.0)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        step = _Step(self.ctx.attention, kv_caches, metadata)
        out = self.decoder(input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False,
                           **{_STEP_KWARG: step})
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head plus the logit post-processing the families' ``forward`` applies (Cohere's scale,
        Granite's divisor, Gemma 2's soft-cap)."""
        logits = self.hf_model.get_output_embeddings()(hidden)
        if self._logit_scale != 1.0:
            logits = logits * self._logit_scale
        if self._logits_scaling != 1.0:
            logits = logits / self._logits_scaling
        if self._final_soft_cap is not None:
            logits = torch.tanh(logits / self._final_soft_cap) * self._final_soft_cap
        return logits

    def kv_cache_spec(self) -> KVCacheSpec:
        cfg = _text_config(self.hf_model.config)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        return KVCacheSpec(num_layers=cfg.num_hidden_layers, num_kv_heads=kv_heads, head_size=head_dim)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to do: transformers loaded the checkpoint when the model was built."""
