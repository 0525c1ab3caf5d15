"""The synchronous engine: input processing -> engine core -> output processing, in the caller's thread.

``LLM`` drives it in a loop; ``AsyncLLM`` drives it from its own engine thread.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

from llmctl.config import EngineArgs
from llmctl.engine.encoder_decoder import EncoderDecoderInputs
from llmctl.engine.input_processor import InputProcessor, PromptType
from llmctl.engine.output_processor import OutputProcessor
from llmctl.engine.request import Request, RequestStatus
from llmctl.executor import make_core
from llmctl.lora.adapter import LoRAAdapter
from llmctl.lora.request import LoRARequest
from llmctl.multimodal.processor import MultiModalProcessor, parse_limit_mm_per_prompt
from llmctl.outputs import RequestOutput
from llmctl.pooling.frontend import PoolingFrontend, PreparedPooling
from llmctl.pooling.outputs import PoolingRequestOutput
from llmctl.pooling.params import PoolingParams
from llmctl.sampling_params import SamplingParams
from llmctl.structured_output.manager import StructuredOutputManager


@dataclass
class PreparedRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    requests: list[Request]


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        from llmctl.loader.tokenizer import load_tokenizer

        self.args = args
        self.core = make_core(args)  # an EngineCore, or the mp executor's stand-in for its worker processes
        self.tokenizer = load_tokenizer(self.core.source, args.tokenizer, args.revision, args.trust_remote_code)
        self.model_config = self.core.model_config
        self.cache_config = self.core.cache_config
        eos = (*self.model_config.eos_token_ids, *([self.tokenizer.eos_token_id] if isinstance(
            getattr(self.tokenizer, "eos_token_id", None), int) else []))
        self.structured_output = StructuredOutputManager(
            self.tokenizer, self.model_config.vocab_size, tuple(dict.fromkeys(eos)),
            args.structured_outputs_backend, args.structured_outputs_compile_timeout)
        self.multimodal = self._multimodal_processor()
        self.input_processor = InputProcessor(self.tokenizer, self.model_config, self.cache_config, args.max_logprobs,
                                              self.structured_output, self.multimodal, self._encoder_decoder_inputs())
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self.runner_type = self.core.runner_type
        self.pooling: PoolingFrontend | None = None
        if self.runner_type == "pooling":
            images = bool(getattr(self.core.model, "accepts_images", False))
            self.pooling = PoolingFrontend(self.tokenizer, self.model_config, self.cache_config, self.core.model.pooler,
                                           image_processor_dir=self.core.source.local_dir if images else None)

    def _multimodal_processor(self) -> MultiModalProcessor | None:
        """Only for a model that takes images; a text-only model refuses ``multi_modal_data`` by name."""
        model = getattr(self.core, "model", None)  # a remote core (mp, ray) holds none: its ranks run text models
        if self.core.runner_type != "generate" or not getattr(model, "supports_multimodal", False):
            return None
        return MultiModalProcessor(self.core.source.local_dir, model.image_token_id, model.image_token_count,
                                   parse_limit_mm_per_prompt(self.args.limit_mm_per_prompt),
                                   self.args.trust_remote_code,
                                   self.tokenizer if getattr(model, "mm_image_processor_only", False) else None,
                                   getattr(model, "image_wrap_token_ids", None),
                                   getattr(model, "chat_image_separator", "\n"))

    def _encoder_decoder_inputs(self) -> EncoderDecoderInputs | None:
        model = getattr(self.core, "model", None)  # a remote core (mp, ray, data parallel) holds none
        if model is None and getattr(self.model_config.hf_config, "is_encoder_decoder", False):
            raise ValueError("distributed_executor_backend: encoder-decoder models run in-process ('uni', "
                             "data_parallel_size=1)")
        if not getattr(model, "is_encoder_decoder", False):
            return None
        return EncoderDecoderInputs.from_config(self.model_config, self.cache_config.block_size)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a sequence (config, generation_config and tokenizer), for callers that decode
        outside the engine's own stop handling, such as beam search."""
        return self.input_processor.eos_token_ids

    def default_sampling_params(self) -> SamplingParams:
        gen = self.model_config.generation_config
        return SamplingParams.from_generation_config(gen) if gen else SamplingParams()

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def prepare_request(self, request_id: str, prompt: PromptType,
                        params: SamplingParams | PoolingParams | None = None,
                        arrival_time: float | None = None, lora_request: LoRARequest | None = None
                        ) -> PreparedRequest | PreparedPooling:
        """Validate and tokenize without touching engine state, so it can run on the caller's thread. Raises
        ``ValueError`` naming the field before anything is allocated. A LoRA adapter is read and checked here too,
        off the engine loop."""
        if self.pooling is not None:
            if isinstance(params, SamplingParams):
                raise ValueError("runner: this model runs as a pooling model (embeddings, scores, classes) and "
                                 "does not generate text")
            if lora_request is not None:
                raise ValueError("lora_request: LoRA adapters apply to generating models only")
            return self.pooling.prepare(request_id, prompt, params, arrival_time)
        if isinstance(params, PoolingParams):
            raise ValueError("pooling_params: this model runs with runner='generate'; start it with "
                             "runner='pooling' for embeddings, scores or classes")
        params = params if params is not None else self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        adapter = self.load_lora(lora_request) if lora_request is not None else None
        processed = self.input_processor.tokenize(prompt)
        requests = self.input_processor.make_requests(request_id, processed, params, arrival_time)
        if adapter is not None:
            salt = f"lora:{adapter.adapter_id}:{adapter.request.lora_path}".encode()
            for r in requests:
                r.lora, r.cache_salt = adapter, salt
        return PreparedRequest(request_id, processed.prompt, processed.prompt_token_ids, params, requests)

    def add_prepared(self, prepared: PreparedRequest | PreparedPooling) -> None:
        if self.output_processor.has(prepared.request_id) or (self.pooling and self.pooling.has(prepared.request_id)):
            raise ValueError(f"request_id: {prepared.request_id!r} is already in use")
        if isinstance(prepared, PreparedPooling):
            if self.pooling is None:
                raise ValueError("pooling_params: this model runs with runner='generate'")
            self.pooling.add(prepared)
            for r in prepared.requests:
                self.core.add_request(r)
            return
        self.output_processor.add(prepared.request_id, prepared.prompt, prepared.prompt_token_ids, prepared.params,
                                  [r.request_id for r in prepared.requests], prepared.requests[0].arrival_time)
        for r in prepared.requests:
            self.core.add_request(r)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams | None = None,
                    arrival_time: float | None = None, lora_request: LoRARequest | None = None) -> None:
        self.add_prepared(self.prepare_request(request_id, prompt, params, arrival_time, lora_request))

    def load_lora(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Read and check an adapter into the host cache (any thread); ``ValueError`` names what is wrong."""
        if self.core.lora is None:
            raise ValueError("lora_request: this engine was started without enable_lora=True (--enable-lora)")
        return self.core.lora.load(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.core.lora is not None and self.core.lora.remove(lora_id)

    def list_loras(self) -> list[int]:
        return [] if self.core.lora is None else self.core.lora.cached_ids()

    def abort_request(self, request_ids: list[str] | str) -> list[RequestOutput | PoolingRequestOutput]:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        finals: list[RequestOutput | PoolingRequestOutput] = []
        for rid in request_ids:
            if self.pooling is not None and self.pooling.has(rid):
                self.core.abort([rid])
                pooled_final = self.pooling.abort(rid)
                if pooled_final is not None:
                    finals.append(pooled_final)
                continue
            self.core.abort(self.output_processor.child_ids(rid))
            final = self.output_processor.abort(rid)
            if final is not None:
                finals.append(final)
        return finals

    def step(self) -> list[RequestOutput | PoolingRequestOutput]:
        core_outputs = self.core.step()
        if self.pooling is not None:
            return [out for co in core_outputs
                    if (out := self.pooling.finish(co.request_id, co.pooled, co.error)) is not None]
        outputs, to_stop = self.output_processor.process(core_outputs)
        for child_id in to_stop:
            self.core.finish_request(child_id, RequestStatus.FINISHED_STOPPED)
        return outputs

    def shutdown(self) -> None:
        """Stop the worker processes (``mp``) or leave the tensor-parallel group; idempotent."""
        self.core.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    def get_stats(self) -> dict[str, Any]:
        return {**self.core.get_stats(), "time": time.time()}
