"""Op overrides for ``example-cpu``. Each keeps the exact signature and semantics of its reference in
:mod:`llmctl.ops.reference` (out-of-place, same output dtype), computed differently: the RMS comes from
``torch.linalg.vector_norm`` instead of a mean of squares."""

from __future__ import annotations

import math

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # VENDOR: call your fused RMSNorm kernel here.
    xf = x.float()
    rms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True) / math.sqrt(x.shape[-1])
    normed = xf / torch.sqrt(rms * rms + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # VENDOR: a real fused kernel saves one pass over memory here.
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def greedy_sample(logits: torch.Tensor) -> torch.Tensor:
    # VENDOR: the sampler's all-greedy fast path; logits arrive in the model's dtype. Same answer as an argmax
    # of the float32 logits, ties to the first index.
    return torch.max(logits.float(), dim=-1).indices
