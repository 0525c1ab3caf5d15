"""Parameter allocation shared by the layers."""

from __future__ import annotations

import torch
from torch import nn


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """Uninitialised, inference-only storage: weights are always overwritten by the loader, so spending time
    on random init (as ``nn.Linear`` does) would only slow model construction down."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """Copy a checkpoint tensor into a parameter, failing loudly on a shape mismatch rather than broadcasting."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"weight {name}: checkpoint shape {tuple(src.shape)} does not match {tuple(dst.shape)}")
    dst.copy_(src)
