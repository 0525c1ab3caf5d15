"""Poolers: from one prompt's final hidden states to the vector a task returns.

A pooling model owns a ``pooler`` (its classifier head, if any, lives in the model and is handed in as a
callable), and the model runner calls it once per step with every pooling request's hidden states. Maths runs
in float32 whatever the model's dtype, as sentence-transformers' reference does on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmctl.pooling.params import PoolingParams

POOLING_TYPES = ("CLS", "MEAN", "LAST")


@dataclass(frozen=True)
class PoolerConfig:
    """How a checkpoint wants its hidden states pooled; ``None`` fields take the model family's default.
    Read from sentence-transformers' module files where a checkpoint has them (:mod:`llmctl.pooling.config`),
    or given by the user (``pooler_config``)."""

    pooling_type: str | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.pooling_type is not None and self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooler_config.pooling_type: must be one of {', '.join(POOLING_TYPES)}, "
                             f"got {self.pooling_type!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"pooler_config.normalize: must be true or false, got {self.normalize!r}")


def pool_tokens(hidden: torch.Tensor, pooling_type: str) -> torch.Tensor:
    """[num_tokens, hidden] -> [hidden] in float32."""
    if pooling_type == "CLS":
        return hidden[0].float()
    if pooling_type == "LAST":
        return hidden[-1].float()
    if pooling_type == "MEAN":
        return hidden.float().mean(dim=0)
    raise ValueError(f"pooling_type: unknown {pooling_type!r}")


class EmbeddingPooler:
    """Pool, keep the first ``dimensions`` values (Matryoshka), then L2-normalise (unless ``normalize=False``).
    Truncating before normalising is what Matryoshka training assumes."""

    tasks = ("embed", "score", "encode")
    default_task = "embed"

    def __init__(self, pooling_type: str, normalize: bool = True) -> None:
        if pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type: must be one of {', '.join(POOLING_TYPES)}, got {pooling_type!r}")
        self.pooling_type = pooling_type
        self.normalize = normalize

    def __call__(self, hidden: Sequence[torch.Tensor], params: Sequence[PoolingParams]) -> list[torch.Tensor]:
        out = []
        for h, p in zip(hidden, params, strict=True):
            v = pool_tokens(h, self.pooling_type)
            if p.dimensions is not None:
                v = v[: p.dimensions]
            if p.normalize if p.normalize is not None else self.normalize:
                v = F.normalize(v, p=2.0, dim=-1)
            out.append(v)
        return out


class ClassifierPooler:
    """Pool, run the model's head (``[n, hidden] -> [n, num_labels]``) on the whole batch at once, then softmax
    over the labels (sigmoid for a single label) unless ``use_activation=False``. A one-label model is a
    cross-encoder: its sigmoid is the relevance score."""

    tasks = ("classify", "score", "encode")
    default_task = "classify"

    def __init__(self, pooling_type: str, head: Callable[[torch.Tensor], torch.Tensor], num_labels: int) -> None:
        self.pooling_type = pooling_type
        self.head = head
        self.num_labels = num_labels

    def __call__(self, hidden: Sequence[torch.Tensor], params: Sequence[PoolingParams]) -> list[torch.Tensor]:
        if not hidden:
            return []
        pooled = torch.stack([pool_tokens(h, self.pooling_type) for h in hidden])
        dtype = hidden[0].dtype
        logits = self.head(pooled.to(dtype)).float()
        out = []
        for row, p in zip(logits, params, strict=True):
            if p.use_activation is False:
                out.append(row)
            elif self.num_labels == 1:
                out.append(torch.sigmoid(row))
            else:
                out.append(torch.softmax(row, dim=-1))
        return out
