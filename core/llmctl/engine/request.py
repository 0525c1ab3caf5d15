"""The engine core's view of one sequence being generated."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from llmctl.pooling.params import PoolingParams
from llmctl.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llmctl.multimodal.inputs import MultiModalFeature
    from llmctl.structured_output.request_grammar import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass
class Request:
    """One sequence. ``n > 1`` becomes n of these (see ``leader``), so the core only ever sees n == 1."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    eos_token_ids: tuple[int, ...] = ()
    max_tokens: int = 16
    # A sibling in the same n-group whose prompt must be computed first, so this one hits its cached blocks.
    leader: Request | None = None
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # The KV manager's block table for this request (the same list: allocations extend it in place); the scheduler
    # binds it, the model runner and the draft proposers read it, and nothing else changes it.
    block_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # wall clock of the first admission (queue-time metric)
    generator: torch.Generator | None = None
    # Pooling requests (runner="pooling"): computed in one step, pooled instead of sampled (llmctl.pooling).
    pooling_params: PoolingParams | None = None
    token_type_ids: list[int] | None = None  # segment ids of a cross-encoder pair, one per prompt token
    pixel_values: torch.Tensor | None = None  # an image request's preprocessed pixels [3, H, W] (CLIP)
    # Images of a generating request (llmctl.multimodal): placeholder ranges in the prompt, pixels, content hashes.
    mm_features: list[MultiModalFeature] = field(default_factory=list)
    # M-RoPE models (Qwen2-VL): the prompt's [3, prompt_len] positions, computed from the images' grids at the first
    # prefill, and the shift of every later token's index (``ModelRunner``).
    mrope_positions: Any = None
    mrope_position_delta: int = 0
    grammar: RequestGrammar | None = None  # structured output: advances with every appended token
    # Draft tokens proposed for the next step (speculative decoding); verified, then dropped, by that step.
    spec_token_ids: list[int] = field(default_factory=list)
    lora: Any = None  # the request's llmctl.lora LoRAAdapter (held here, so unloading never breaks it), or None
    # Seeds the request's prefix-cache hash chain: requests with other adapters never share KV blocks.
    cache_salt: bytes | None = None
    # Encoder-decoder models (llmctl.engine.encoder_decoder): the encoder input's length; the prompt holds it padded
    # to a block boundary, then the decoder start token.
    encoder_len: int | None = None

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)
        sp = self.sampling_params
        if sp.seed is not None:
            self.generator = torch.Generator().manual_seed(sp.seed % (2**63))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def prompt_computed(self) -> bool:
        return self.num_computed_tokens >= len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status.finished
