"""llmctl: a fast, plugin-based LLM inference engine.

``from llmctl import LLM, SamplingParams`` for offline batch inference; ``AsyncLLM`` for serving.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "llmctl.entrypoints.llm",
    "AsyncLLM": "llmctl.engine.async_llm",
    "EngineArgs": "llmctl.config",
    "SamplingParams": "llmctl.sampling_params",
    "RequestOutput": "llmctl.outputs",
    "CompletionOutput": "llmctl.outputs",
    "Logprob": "llmctl.outputs",
    "PoolingParams": "llmctl.pooling.params",
    "PoolingRequestOutput": "llmctl.pooling.outputs",
    "EmbeddingRequestOutput": "llmctl.pooling.outputs",
    "ClassificationRequestOutput": "llmctl.pooling.outputs",
    "ScoringRequestOutput": "llmctl.pooling.outputs",
    "BeamSearchParams": "llmctl.beam_search",
    "LoRARequest": "llmctl.lora.request",
}

if TYPE_CHECKING:
    from llmctl.beam_search import BeamSearchParams
    from llmctl.config import EngineArgs
    from llmctl.engine.async_llm import AsyncLLM
    from llmctl.entrypoints.llm import LLM
    from llmctl.lora.request import LoRARequest
    from llmctl.outputs import CompletionOutput, Logprob, RequestOutput
    from llmctl.pooling.outputs import (
        ClassificationRequestOutput,
        EmbeddingRequestOutput,
        PoolingRequestOutput,
        ScoringRequestOutput,
    )
    from llmctl.pooling.params import PoolingParams
    from llmctl.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy so that `import llmctl` (e.g. by a plugin or `llmctl doctor`) does not pay for torch model code.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmctl' has no attribute {name!r}")


__all__ = ["LLM", "AsyncLLM", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "PoolingParams", "PoolingRequestOutput", "EmbeddingRequestOutput", "ClassificationRequestOutput",
           "ScoringRequestOutput", "BeamSearchParams", "LoRARequest", "__version__"]
