"""What a model needs from the engine, and what the engine needs from a model.

A model is an ``nn.Module`` built as ``cls(hf_config, ctx)``. It runs on core's flattened batch and calls every
overridable op through ``ctx.ops`` and attention through ``ctx.attention``, so a platform plugin's kernels are
used without the model knowing which platform it is on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from llmctl.attention import AttentionMetadata
from llmctl.ops import Ops
from llmctl.plugins.types import AttentionBackend
from llmctl.tensor_parallel import PipelineStage, TensorParallelGroup


@dataclass
class ModelContext:
    ops: Ops
    attention: AttentionBackend
    dtype: torch.dtype
    device: torch.device
    quant: Any = None  # a llmctl.quantization.QuantConfig: the linear layers' quantization, None for plain weights
    extra: dict[str, Any] = field(default_factory=dict)
    # The tensor-parallel group this process is a rank of (llmctl.tensor_parallel); size 1 without parallelism.
    tp: TensorParallelGroup = field(default_factory=TensorParallelGroup)
    pp: PipelineStage = field(default_factory=PipelineStage)  # this rank's pipeline stage; all layers at size 1
    # enable_expert_parallel: MoE layers place whole experts on the ranks of ``tp`` (llmctl.expert_parallel)
    expert_parallel: bool = False
    # with expert_parallel across data-parallel replicas: the group of every replica's ranks, whose MoE layers
    # place their experts over all of it (llmctl.expert_parallel); None otherwise
    ep: TensorParallelGroup | None = None


@dataclass(frozen=True)
class KVCacheSpec:
    """Per-layer KV geometry the block manager and runner size the cache from."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    sliding_window: int | None = None


class CausalLM(Protocol):
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        """[num_tokens] ids and positions -> [num_tokens, hidden] final hidden states (after the last norm)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] logits in the model's dtype, only for the rows where a token is sampled."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Consume Hugging Face-named tensors (fusing q/k/v and gate/up as the model's layout wants)."""

    def kv_cache_spec(self) -> KVCacheSpec: ...
