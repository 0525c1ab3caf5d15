"""Op-override entry points with the reference signatures that import their Triton kernel on first call.

Registering these costs nothing at plugin load time (no ``import triton``); the kernel module is imported the
first time the engine actually runs the op on a GPU.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from llmctl_triton.norm import rms_norm as kernel

    return kernel(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from llmctl_triton.norm import fused_add_rms_norm as kernel

    return kernel(x, residual, weight, eps)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    from llmctl_triton.rotary import rotary_embedding as kernel

    return kernel(positions, query, key, cos_sin_cache, is_neox_style)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    from llmctl_triton.activation import silu_and_mul as kernel

    return kernel(x)


def lora_shrink_expand(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       token_slots: torch.Tensor, active_slots: tuple[int, ...],
                       ranks: torch.Tensor | None = None) -> None:
    from llmctl_triton.lora import lora_shrink_expand as kernel

    kernel(x, y, a, b, token_slots, active_slots, ranks)


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    from llmctl_triton.moe import fused_moe as kernel

    return kernel(hidden, w13, w2, topk_weights, topk_ids, activation)
