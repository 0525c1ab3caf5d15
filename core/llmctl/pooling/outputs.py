"""What a pooling request returns, in vLLM's shapes: ``PoolingRequestOutput`` holds the pooled tensor, and the
task views (``EmbeddingRequestOutput``, ``ClassificationRequestOutput``, ``ScoringRequestOutput``) turn it into
plain Python numbers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PoolingOutput:
    data: torch.Tensor


@dataclass
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    error: str | None = None
    prompt: str | None = None


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True

    @classmethod
    def from_base(cls, out: PoolingRequestOutput) -> EmbeddingRequestOutput:
        data = out.outputs.data
        if data.dim() != 1:
            raise ValueError("embed: the pooled output is not one vector per prompt")
        return cls(out.request_id, EmbeddingOutput(data.float().tolist()), out.prompt_token_ids, out.finished)


@dataclass
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ClassificationRequestOutput:
    request_id: str
    outputs: ClassificationOutput
    prompt_token_ids: list[int]
    finished: bool = True

    @classmethod
    def from_base(cls, out: PoolingRequestOutput) -> ClassificationRequestOutput:
        return cls(out.request_id, ClassificationOutput(out.outputs.data.float().reshape(-1).tolist()),
                   out.prompt_token_ids, out.finished)


@dataclass
class ScoringOutput:
    score: float


@dataclass
class ScoringRequestOutput:
    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True

    @classmethod
    def from_base(cls, out: PoolingRequestOutput) -> ScoringRequestOutput:
        data = out.outputs.data.float().reshape(-1)
        if data.numel() != 1:
            raise ValueError(f"score: the model gives {data.numel()} values per pair, not one score")
        return cls(out.request_id, ScoringOutput(float(data[0])), out.prompt_token_ids, out.finished)
