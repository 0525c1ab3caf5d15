"""Per-request pooling parameters, with vLLM's field names.

Checked once, when the request is prepared: a ``ValueError`` names the field and the limit before anything is
allocated. The checks that need the model (its hidden size, whether it was trained for Matryoshka dimensions,
its context length) run in :mod:`llmctl.pooling.frontend`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

TASKS = ("embed", "classify", "score", "encode")


@dataclass
class PoolingParams:
    """``task``: what the pooled vector is for (``embed``: one normalised vector per prompt; ``classify``: class
    probabilities; ``score``: one relevance number per query/document pair; ``encode``: the raw pooled vector).
    ``None`` lets the engine pick the model's default task.

    ``dimensions``: keep the first N embedding dimensions (Matryoshka models only); ``normalize``: L2-normalise
    embeddings (default on); ``use_activation``: softmax / sigmoid over classifier logits (default on);
    ``truncate_prompt_tokens``: keep at most this many prompt tokens (-1: the model's length) instead of
    rejecting a longer prompt.
    """

    task: str | None = None
    dimensions: int | None = None
    normalize: bool | None = None
    use_activation: bool | None = None
    truncate_prompt_tokens: int | None = None
    extra_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task: must be one of {', '.join(TASKS)}, got {self.task!r}")
        d = self.dimensions
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"dimensions: must be a positive integer, got {d!r}")
        for name in ("normalize", "use_activation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name}: must be true or false, got {value!r}")
        t = self.truncate_prompt_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or (t < 1 and t != -1)):
            raise ValueError(f"truncate_prompt_tokens: must be a positive integer or -1 (the model's length), "
                             f"got {t!r}")

    def clone(self, **changes: Any) -> PoolingParams:
        return replace(self, **changes)
