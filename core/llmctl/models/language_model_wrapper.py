"""A vision-language model is a language model plus an image path: the engine's per-step calls go to the
language model unchanged, so every such wrapper shares them instead of restating them."""

from __future__ import annotations

import torch

from llmctl.attention import AttentionMetadata
from llmctl.layers._module import EngineModule
from llmctl.models.base import KVCacheSpec


class WrapsLanguageModel(EngineModule):
    """Subclasses set ``self.language_model`` (a causal LM of llmctl's own) in ``__init__``."""

    language_model: EngineModule

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model(input_ids, positions, kv_caches, metadata, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def kv_cache_spec(self) -> KVCacheSpec:
        return self.language_model.kv_cache_spec()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)
