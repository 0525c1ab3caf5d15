"""Decoder-only models as embedding models (Qwen3-Embedding, e5-mistral, gte-Qwen): the Llama-family decoder
with causal attention, pooled at the last token and normalised by default.

Registered under the families' base-model names (``Qwen3Model``, ...), which is how such checkpoints are saved;
a ``...ForCausalLM`` checkpoint run with ``runner="pooling"`` maps here too. The LM head, when a checkpoint has
one, is not loaded: nothing here produces logits.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from llmctl.layers._module import EngineModule
from llmctl.models.base import ModelContext
from llmctl.models.llama import LlamaForCausalLM, LlamaModel, layer_sliding_windows
from llmctl.pooling.pooler import EmbeddingPooler, PoolerConfig


class DecoderEmbeddingModel(LlamaForCausalLM):
    is_pooling_model = True
    attention_features: frozenset[str] = frozenset()

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:  # no LM head: skip LlamaForCausalLM.__init__
        EngineModule.__init__(self)
        self.config = hf_config
        self.ctx = ctx
        self.model = LlamaModel(hf_config, ctx)
        self.tie_word_embeddings = False
        self._windows = layer_sliding_windows(hf_config)
        pc: PoolerConfig = ctx.extra.get("pooler_config") or PoolerConfig()
        self.pooler = EmbeddingPooler(pc.pooling_type or "LAST", True if pc.normalize is None else pc.normalize)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("an embedding model has no LM head; run it with runner='pooling'")

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Base-model checkpoints name tensors without the ``model.`` prefix; causal-LM ones carry it and an LM
        head, which is dropped."""
        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith("lm_head."):
                    continue
                yield (name if name.startswith("model.") else "model." + name), tensor

        super().load_weights(renamed())


ARCHITECTURES: tuple[str, ...] = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model")
