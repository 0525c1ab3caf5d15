"""What flows out of one step, in two dataclasses: the model's results as the scheduler takes them
(:class:`ModelStepOutput`, vLLM's ``ModelRunnerOutput``), and what the scheduler reports for each request once it
has applied them (:class:`CoreOutput`, for the output processor)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from llmctl.engine.sampler import RowLogprobs

if TYPE_CHECKING:
    from llmctl.engine.request import Request


@dataclass
class CoreOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[RowLogprobs] | None = None
    prompt_logprobs: list[RowLogprobs] | None = None
    prompt_logprobs_start: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    pooled: torch.Tensor | None = None  # a pooling request's result (it finishes in the step that computes it)
    first_scheduled_time: float | None = None  # wall clock when the scheduler first admitted the request


@dataclass
class ModelStepOutput:
    """One step's results: the tokens each sampling row kept (one, or the accepted drafts plus one under
    speculative decoding) with their logprobs, the prompt logprobs of prompt chunks that asked for them, and the
    pooled results of pooling requests. Nothing in it has been applied to a request yet."""

    sampling_requests: list[Request] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)  # one list per sampling request
    new_logprobs: list[list[RowLogprobs] | None] = field(default_factory=list)
    # request id -> (the first prompt position the rows score, one row per position)
    prompt_logprobs: dict[str, tuple[int, list[RowLogprobs]]] = field(default_factory=dict)
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)  # request id -> the pooler's output
