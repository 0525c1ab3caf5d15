"""The table of op implementations a model and the sampler call, bound once per platform.

The plugin registry fills it (each name from the highest-priority override for the platform, else the reference);
layers and the sampler only ever see this table, never the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmctl.ops import reference


@dataclass(frozen=True)
class Ops:
    """The op implementations bound for one platform, looked up once when the model is built."""

    rms_norm: Callable[..., torch.Tensor]
    fused_add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary_embedding: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[..., torch.Tensor]
    apply_top_k_top_p: Callable[..., torch.Tensor]
    apply_min_p: Callable[..., torch.Tensor]
    greedy_sample: Callable[..., torch.Tensor]
    sampled_logprobs: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    sample_softmax: Callable[..., torch.Tensor]
    pack_linear_weight: Callable[..., reference.PackedLinearWeight]
    linear: Callable[..., torch.Tensor]
    pack_gated_linear_weight: Callable[..., tuple[reference.PackedLinearWeight, torch.Tensor | None] | None]
    gated_linear: Callable[..., torch.Tensor]
    pack_fused_moe_weights: Callable[..., tuple[reference.PackedLinearWeight, reference.PackedLinearWeight] | None]
    fused_moe: Callable[..., torch.Tensor]
    lora_shrink_expand: Callable[..., None]

    @classmethod
    def reference(cls) -> Ops:
        return cls(**{name: getattr(reference, name) for name in reference.OP_NAMES})
