"""Dense projections whose weights are stored as given (``[out, in]``, the checkpoint layout)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.layers._module import EngineModule
from llmctl.layers._params import copy_checked, empty_param
from llmctl.ops import Ops
from llmctl.ops.reference import PackedLinearWeight

if TYPE_CHECKING:
    from llmctl.lora.layers import LoRALinearSlots
    from llmctl.quantization.base import LinearQuantizer


def bind_linear_ops(module: nn.Module, ops: Ops, release_plain: bool) -> None:
    """After loading: let the platform repack ``module.weight`` for its ``linear`` (once). When it made a new
    tensor, the layer runs on that and, unless something else reads the plain weight (a tied embedding),
    releases the plain copy so the weights are not held twice."""
    plain = module.weight.detach()
    packed = ops.pack_linear_weight(plain)
    module._linear = ops.linear
    if packed is not plain:
        module._packed = packed
        if release_plain:
            module.weight.data = module.weight.data.new_empty(0)


def _released_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    raise RuntimeError("this projection's weights were handed to a fused op; call that op instead")


def _quantized_linear(parts: list[tuple[Any, dict[str, torch.Tensor], Any, slice | None]], x: torch.Tensor,
                      _weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A quantized layer's matmul through its kernel(s); several parts (shards of a merged layer whose formats
    differ) run one after another and are concatenated."""
    if len(parts) == 1:
        kernel, weights, spec, _ = parts[0]
        return kernel.apply(x, weights, bias, spec)
    return torch.cat([kernel.apply(x, weights, None if bias is None or rows is None else bias[rows], spec)
                      for kernel, weights, spec, rows in parts], dim=-1)


class Linear(EngineModule):
    """A projection whose weights are plain, or, with a quantizer set before loading, held in a quantized
    format whose matmul a platform kernel runs (``llmctl.quantization``): the models never see the difference."""

    quantizer: LinearQuantizer | None = None
    quantizable = True  # False: kept in the model dtype whatever the quantization covers (a MoE router)
    lora: LoRALinearSlots | None = None  # set by llmctl.lora before loading when LoRA is enabled
    # True: a parent reads this layer's plain weight after loading (MLA splits kv_b_proj into its absorbed halves),
    # so a checkpoint that stores it quantized is loaded as such and dequantized once when loading ends, as vLLM
    # does; quantizing at load (int8, fp8) leaves it in the model dtype, since rounding it would only add error.
    dequantize_after_load = False

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = empty_param(out_features, in_features, dtype=dtype, device=device)
        self.bias = empty_param(out_features, dtype=dtype, device=device) if bias else None
        self._linear = F.linear
        self._packed: PackedLinearWeight | None = None

    def bind_ops(self, ops: Ops) -> None:
        if self._linear is not _released_linear and self.quantizer is None:
            bind_linear_ops(self, ops, release_plain=True)

    def set_quantizer(self, quantizer: LinearQuantizer) -> None:
        """Before loading: the quantizer replaces the plain weight with the checkpoint's quantized tensors."""
        dtype, device = self.weight.dtype, self.weight.device
        del self.weight
        self.quantizer = quantizer
        quantizer.create_weights(self, dtype, device)

    def set_dequantized(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        """After loading a ``dequantize_after_load`` layer: its quantized tensors give way to the plain weight."""
        self.quantizer = None
        self.weight = nn.Parameter(weight.to(dtype), requires_grad=False)

    def bind_quantized(self, parts: list[tuple[Any, dict[str, torch.Tensor], Any, slice | None]]) -> None:
        """After loading: (kernel, its processed weights, QuantLinearSpec, bias rows) per part."""
        self.quant_parts = parts
        self._packed = torch.empty(0)  # forward passes it as the (unused) weight argument
        self._linear = lambda x, w, b: _quantized_linear(parts, x, w, b)

    def release_weight(self) -> None:
        """For a parent that runs this projection through a fused op on its own copy of the weights: frees the
        plain weight and bias, and makes calling this layer directly an error instead of a wrong result."""
        self.weight.data = self.weight.data.new_empty(0)
        if self.bias is not None:
            self.bias.data = self.bias.data.new_empty(0)
        self._packed = None
        self._linear = _released_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._linear(x, self.weight if self._packed is None else self._packed, self.bias)
        return y if self.lora is None else self.lora.add(x, y)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim (q/k/v, gate/up), so one matmul
    replaces several small ones. Checkpoints keep them separate; ``load_shard`` writes each into its rows."""

    def __init__(self, in_features: int, output_sizes: list[int], *, bias: bool, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias, dtype=dtype, device=device)
        self.output_sizes = list(output_sizes)
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]

    def load_shard(self, param: torch.Tensor, shard: int, tensor: torch.Tensor, name: str) -> None:
        if self.quantizer is not None and param is not self.bias:
            pname = next(n for n, p in self._parameters.items() if p is param)
            self.quantizer.load_shard(self, pname, shard, tensor, name)
            return
        rows = param.data.narrow(0, self.offsets[shard], self.output_sizes[shard])
        copy_checked(rows, tensor, name)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(y.split(self.output_sizes, dim=-1))
