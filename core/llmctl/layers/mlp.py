"""The SwiGLU feed-forward block of Llama-family models."""

from __future__ import annotations

import torch

from llmctl.layers._module import EngineModule
from llmctl.layers.linear import Linear, MergedLinear
from llmctl.plugins.registry import Ops

SILU_ACTS = frozenset({"silu", "swish"})


class GatedMLP(EngineModule):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one projection of width ``2 * intermediate``
    so the platform's ``silu_and_mul`` kernel can consume it directly."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, ops: Ops, *, bias: bool = False,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        if hidden_act not in SILU_ACTS:
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; supported: {', '.join(sorted(SILU_ACTS))}")
        self.ops = ops
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size, intermediate_size], bias=bias,
                                         dtype=dtype, device=device)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))
