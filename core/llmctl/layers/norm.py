"""RMSNorm through the platform's (possibly fused) kernels."""

from __future__ import annotations

import torch

from llmctl.layers._module import EngineModule
from llmctl.layers._params import empty_param
from llmctl.ops import Ops


class RMSNorm(EngineModule):
    def __init__(self, hidden_size: int, eps: float, ops: Ops, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = empty_param(hidden_size, dtype=dtype, device=device)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With ``residual``, adds it first and also returns the sum: the decoder keeps the running residual
        stream this way so the add and the norm can be one fused kernel."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
