"""What the engine hands back to callers (vLLM's shapes and names)."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec


class Logprob(msgspec.Struct, gc=False):
    """vLLM's fields and attribute names, as a struct the cyclic collector never tracks (it holds a float, an int
    and a string, so it can be in no cycle): a request with ``n=16`` and ``logprobs=20`` holds tens of thousands of
    them while it runs, and as dataclasses they made up most of what a full collection during serving walked,
    with the engine thread and the event loop stopped. (A NamedTuple would not do: only exact tuples are ever
    untracked.)"""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the sampled token plus the top-N).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or token id that ended the sequence

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = None
    num_cached_tokens: int = field(default=0)
