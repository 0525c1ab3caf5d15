"""The SwiGLU feed-forward block of Llama-family models."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmctl.layers._module import EngineModule
from llmctl.layers.parallel import MergedColumnParallelLinear, RowParallelLinear
from llmctl.ops import Ops
from llmctl.ops.reference import PackedLinearWeight
from llmctl.tensor_parallel import SINGLE, TensorParallelGroup

SILU_ACTS = frozenset({"silu", "swish"})


class GatedMLP(EngineModule):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one projection of width ``2 * intermediate``
    so the platform's ``silu_and_mul`` kernel can consume it directly."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, ops: Ops, *, bias: bool = False,
                 dtype: torch.dtype, device: torch.device, tp: TensorParallelGroup = SINGLE) -> None:
        super().__init__()
        if hidden_act not in SILU_ACTS:
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; supported: {', '.join(sorted(SILU_ACTS))}")
        self.ops = ops
        # Split over tensor-parallel ranks by intermediate columns (one all-reduce, in down_proj); plain at size 1.
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size],
                                                       bias=bias, dtype=dtype, device=device, tp=tp)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, dtype=dtype, device=device,
                                           tp=tp, what="intermediate_size")

        self._gated: Callable[..., torch.Tensor] | None = None
        self._gated_weight: PackedLinearWeight | None = None
        self._gated_bias: torch.Tensor | None = None

    def bind_ops(self, ops: Ops) -> None:
        """Where the platform fuses the activation into the gate/up GEMM, its packed weight replaces the
        projection's own (which is then released and never bound to ``linear``)."""
        proj = self.gate_up_proj
        if proj.quantizer is not None:  # quantized: its own kernel runs the GEMM, and the activation where it offers
            self._bind_quantized_gated(proj)
            return
        if proj.lora is not None:  # adapters add to gate and up before the activation: keep the GEMM unfused
            return
        fused = ops.pack_gated_linear_weight(proj.weight.detach(), None if proj.bias is None else proj.bias.detach())
        if fused is None:
            return
        self._gated_weight, self._gated_bias = fused
        self._gated = ops.gated_linear
        proj.release_weight()

    def _bind_quantized_gated(self, proj: MergedColumnParallelLinear) -> None:
        parts = getattr(proj, "quant_parts", None)
        if proj.lora is not None or parts is None or len(parts) != 1:
            return
        kernel, weights, spec, _ = parts[0]
        if not kernel.fuses_silu_and_mul(weights, spec):
            return
        self._gated_bias = proj.bias
        self._gated = lambda x, _unused, bias: kernel.apply_silu_and_mul(x, weights, bias, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gated is not None:
            return self.down_proj(self._gated(x, self._gated_weight, self._gated_bias))
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))
