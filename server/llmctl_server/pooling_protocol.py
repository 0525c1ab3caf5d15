"""Request/response models of the pooling endpoints: OpenAI's ``/v1/embeddings``, vLLM's ``/score`` and the
Jina / Cohere rerank shape (``/rerank``, ``/v1/rerank``, ``/v2/rerank``).

Strict scalars as in :mod:`llmctl_server.protocol`; limits that depend on the model (its length, whether it
takes ``dimensions``) are the engine's to check, and its ``ValueError`` becomes a 400 naming the field.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmctl_server.protocol import SBool, SInt, SStr

MAX_INPUTS = 2048  # texts in one request; more is a 400, not an unbounded fan-out


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Model):
    url: SStr
    detail: SStr | None = None


class EmbeddingContentPart(_Model):
    type: Literal["text", "image_url"]
    text: SStr | None = None
    image_url: ImageURL | None = None


class EmbeddingMessage(_Model):
    role: SStr
    content: SStr | list[EmbeddingContentPart]


class EmbeddingRequest(_Model):
    model: SStr | None = None
    # a string, a list of strings, one tokenized input, or a list of tokenized inputs
    input: SStr | list[SStr] | list[SInt] | list[list[SInt]] | None = None
    # vLLM's chat-style embedding input instead: one text or one image (data: URL) to embed (CLIP)
    messages: list[EmbeddingMessage] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: SInt | None = Field(None, ge=1)
    user: SStr | None = None
    # vLLM's extras
    truncate_prompt_tokens: SInt | None = Field(None, ge=-1)
    normalize: SBool | None = None
    add_special_tokens: SBool = True

    def inputs(self) -> list[str | list[int]]:
        raw = self.input
        if raw is None:
            return []
        if isinstance(raw, str):
            return [raw]
        if raw and all(isinstance(x, int) for x in raw):
            return [list(raw)]  # type: ignore[arg-type]
        return list(raw)  # type: ignore[arg-type]


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class PoolingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: PoolingUsage


class ScoreRequest(_Model):
    """vLLM's ``/score``: ``text_1`` is one query (scored against every ``text_2``) or one per ``text_2``."""

    model: SStr | None = None
    text_1: SStr | list[SStr]
    text_2: SStr | list[SStr]
    truncate_prompt_tokens: SInt | None = Field(None, ge=-1)
    use_activation: SBool | None = None


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreData]
    usage: PoolingUsage


class RerankDocument(_Model):
    text: SStr


class RerankRequest(_Model):
    """Jina's and Cohere's rerank: one query, documents as strings or ``{"text": ...}`` objects."""

    model: SStr | None = None
    query: SStr
    documents: list[SStr | RerankDocument]
    top_n: SInt | None = Field(None, ge=0)
    return_documents: SBool = True
    truncate_prompt_tokens: SInt | None = Field(None, ge=-1)

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, Any] | None = None


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class ClassificationRequest(_Model):
    """vLLM's ``/classify``: one text or a batch."""

    model: SStr | None = None
    input: SStr | list[SStr]
    truncate_prompt_tokens: SInt | None = Field(None, ge=-1)

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ClassificationData(BaseModel):
    index: int
    object: Literal["classification"] = "classification"
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassificationData]
    usage: PoolingUsage
