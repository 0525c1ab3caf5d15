"""MoE inputs on which the torch reference of ``fused_moe`` is exact, shared by the CPU and Triton kernel tests."""

from __future__ import annotations

import torch

# (tokens, hidden, intermediate, experts, top_k)
EXACT_SHAPES = ((1, 16, 16, 4, 2), (9, 48, 32, 8, 2), (40, 40, 16, 5, 3))


def integer_case(tokens: int, hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype,
                 gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Small integer activations and weights, gate sums either 0 or at least 20 (SiLU is then exactly 0 or its
    input in float32, whichever exp computes it) and routing weights in eighths: every float32 sum and product is
    exact, in any order. So in float32 the reference is exact, and in bf16 what remains are its roundings between
    ops (products grow past bf16's 8 bits), which a kernel that rounds at the same points reproduces bit for bit."""
    x = torch.randint(2, 4, (tokens, hidden), generator=gen).float()
    gate = torch.randint(0, 2, (experts, inter, hidden), generator=gen).float()
    gate[gate.sum(-1) < 10] = 1.0  # every row has 10 ones or more, so its sum (x >= 2) is at least 20 ...
    gate[:, ::5] = 0.0  # ... or is all zero
    up = torch.randint(-1, 2, (experts, inter, hidden), generator=gen).float()
    w2 = torch.randint(-1, 2, (experts, hidden, inter), generator=gen).float()
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.randint(1, 8, (tokens, top_k), generator=gen).float() / 8
    return (x.to(dtype), torch.cat((gate, up), dim=1).to(dtype), w2.to(dtype), weights.to(dtype), ids)
