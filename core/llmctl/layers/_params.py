"""Parameter allocation shared by the layers, and reading checkpoint tensors (whole, or a tensor-parallel rank's
slice of one that has not been read yet)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """Uninitialised, inference-only storage: weights are always overwritten by the loader, so spending time
    on random init (as ``nn.Linear`` does) would only slow model construction down."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def materialize(src: Any) -> torch.Tensor:
    """A checkpoint tensor as a tensor: itself, or all of a lazy one (``llmctl.loader.weights.LazyTensor``)."""
    return src if isinstance(src, torch.Tensor) else src.read()


def read_slice(src: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """``length`` entries of ``src`` along ``dim`` from ``start``; a lazy tensor reads only those from disk."""
    if isinstance(src, torch.Tensor):
        return src.narrow(dim, start, length)
    return src.read_slice(dim, start, length)


class SlicedTensor:
    """``length`` entries of a checkpoint tensor along ``dim`` from ``start``, not read yet: one projection of a
    fused checkpoint tensor handed to a quantizer, which then reads only its rank's part of it."""

    def __init__(self, src: Any, dim: int, start: int, length: int) -> None:
        self.src, self.dim, self.start, self.length = src, dim, start, length
        shape = list(src.shape)
        shape[dim] = length
        self.shape = torch.Size(shape)

    def read(self) -> torch.Tensor:
        return read_slice(self.src, self.dim, self.start, self.length)

    def read_slice(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim == self.dim:
            return read_slice(self.src, dim, self.start + start, length)
        return self.read().narrow(dim, start, length)


def copy_checked(dst: torch.Tensor, src: Any, name: str) -> None:
    """Copy a checkpoint tensor into a parameter, failing loudly on a shape mismatch rather than broadcasting."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"weight {name}: checkpoint shape {tuple(src.shape)} does not match {tuple(dst.shape)}")
    dst.copy_(materialize(src))
