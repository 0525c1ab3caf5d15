"""Dense projections whose weights are stored as given (``[out, in]``, the checkpoint layout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.layers._params import copy_checked, empty_param


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = empty_param(out_features, in_features, dtype=dtype, device=device)
        self.bias = empty_param(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim (q/k/v, gate/up), so one matmul
    replaces several small ones. Checkpoints keep them separate; ``load_shard`` writes each into its rows."""

    def __init__(self, in_features: int, output_sizes: list[int], *, bias: bool, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias, dtype=dtype, device=device)
        self.output_sizes = list(output_sizes)
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]

    def load_shard(self, param: torch.Tensor, shard: int, tensor: torch.Tensor, name: str) -> None:
        rows = param.data.narrow(0, self.offsets[shard], self.output_sizes[shard])
        copy_checked(rows, tensor, name)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(y.split(self.output_sizes, dim=-1))
