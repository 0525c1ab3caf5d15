"""Pooling models: embeddings, classification and scoring from one prefill, without sampling.

A pooling request runs through the same scheduler, KV cache and model runner as a generation request; its whole
prompt is computed in one step (bidirectional attention needs every key), and the runner hands the model's
final hidden states of that prompt to the model's pooler instead of the sampler.
"""

from llmctl.pooling.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from llmctl.pooling.params import PoolingParams

__all__ = [
    "ClassificationOutput",
    "ClassificationRequestOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "PoolingOutput",
    "PoolingParams",
    "PoolingRequestOutput",
    "ScoringOutput",
    "ScoringRequestOutput",
]
