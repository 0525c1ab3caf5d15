"""What the server needs from an engine: the typed seam between HTTP and ``llmctl.AsyncLLM``.

The server is written against this protocol rather than against ``AsyncLLM`` itself, so a test can hand it a
stand-in and a reader sees in one place everything the HTTP layer touches. ``AsyncLLM`` satisfies it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from llmctl.config import EngineArgs, ModelConfig
from llmctl.outputs import RequestOutput
from llmctl.pooling.outputs import PoolingRequestOutput
from llmctl.sampling_params import SamplingParams


@runtime_checkable
class EngineClient(Protocol):
    #: The engine's arguments; the server reads ``max_num_seqs`` for admission.
    args: EngineArgs
    #: ``max_model_len``, ``vocab_size``, ``model`` and ``served_model_name`` for limits and ``/v1/models``.
    model_config: ModelConfig
    #: A Hugging Face tokenizer (chat template, ``/tokenize``, detokenizing logprobs).
    tokenizer: Any
    #: The pooling frontend (tasks, limits) of a pooling model (``runner="pooling"``), else ``None``.
    pooling: Any
    #: The ``MultiModalProcessor`` (image token, per-prompt limits) of a model that takes images, else ``None``.
    multimodal: Any

    @property
    def is_running(self) -> bool:
        """False once the engine loop has stopped, for whatever reason."""

    @property
    def errored(self) -> bool:
        """True when the engine loop died of an error (the server then answers 503 and exits)."""

    def get_stats(self) -> dict[str, Any]:
        """A snapshot of the engine's counters for ``/metrics``; must not block on a step."""

    def default_sampling_params(self) -> SamplingParams:
        """The model's generation defaults (``generation_config``) that requests override."""

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a sequence; beam search, which decodes outside the engine's stop handling, needs
        them."""

    def generate(self, prompt: Any, sampling_params: SamplingParams | None = None, request_id: str | None = None,
                 lora_request: Any = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request; raises ``ValueError`` for a request the engine refuses."""

    def encode(self, prompt: Any, pooling_params: Any = None, request_id: str | None = None
               ) -> AsyncIterator[PoolingRequestOutput]:
        """The one, final output of a pooling request (``/v1/embeddings``, ``/score``, ...)."""

    def load_lora(self, lora_request: Any) -> None:
        """Read and check a LoRA adapter (``--lora-modules``, ``/v1/load_lora_adapter``); ``ValueError`` says why
        not."""

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (a client went away)."""
