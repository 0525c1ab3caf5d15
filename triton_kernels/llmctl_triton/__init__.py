"""llmctl-triton: Triton kernels shared by llmctl's GPU plugins (CUDA and ROCm).

Every kernel has a thin wrapper with the exact signature of core's torch reference, so it can be registered as
an op override or used by :class:`TritonAttentionBackend`. Set ``TRITON_INTERPRET=1`` before importing the
kernels to run them on CPU tensors in Triton's interpreter (that is how CI checks them).

Names are resolved lazily: a GPU plugin that registers the backend on a machine that never selects it does
not pay for importing Triton, and a host without Triton still loads the plugin (its platform just says why it
is unavailable).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TritonAttentionBackend": "llmctl_triton.backend",
    "op_overrides": "llmctl_triton.backend",
    "paged_attention": "llmctl_triton.attention",
    "use_split_k": "llmctl_triton.attention",
    "write_kv": "llmctl_triton.cache",
    "rms_norm": "llmctl_triton.norm",
    "fused_add_rms_norm": "llmctl_triton.norm",
    "rotary_embedding": "llmctl_triton.rotary",
    "silu_and_mul": "llmctl_triton.activation",
    "lora_shrink_expand": "llmctl_triton.lora",
    "fused_moe": "llmctl_triton.moe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmctl_triton' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
