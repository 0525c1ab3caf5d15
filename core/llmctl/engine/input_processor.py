"""Validates and tokenizes prompts into core requests, before anything is allocated.

Every rejection is a ``ValueError`` that names the field and the limit, so the server can turn it into a 400
and the offline API into a readable message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmctl.config import CacheConfig, ModelConfig
from llmctl.engine.logits_controls import tokenize_bad_words
from llmctl.engine.request import Request
from llmctl.sampling_params import SamplingParams
from llmctl.structured_output.manager import StructuredOutputManager

if TYPE_CHECKING:
    from llmctl.engine.encoder_decoder import EncoderDecoderInputs
    from llmctl.multimodal.inputs import MultiModalFeature
    from llmctl.multimodal.processor import MultiModalProcessor

PromptType = str | dict[str, Any] | list[int]


@dataclass
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]
    mm_features: list[MultiModalFeature] = field(default_factory=list)


def check_prompt_token_ids(ids: list[int], vocab_size: int) -> None:
    """The one check of prompt token ids, shared by generation and pooling, so both refuse the same inputs with
    the same words."""
    if not ids:
        raise ValueError("prompt: must contain at least one token")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"prompt_token_ids: token id {t!r} is outside the vocabulary (0..{vocab_size - 1})")


class InputProcessor:
    def __init__(self, tokenizer: Any, model_config: ModelConfig, cache_config: CacheConfig,
                 max_logprobs: int = 20, structured: StructuredOutputManager | None = None,
                 multimodal: MultiModalProcessor | None = None,
                 encoder_decoder: EncoderDecoderInputs | None = None) -> None:
        self.tokenizer = tokenizer
        self.encoder_decoder = encoder_decoder
        self.multimodal = multimodal
        self.structured = structured
        self.model_config = model_config
        self.cache_config = cache_config
        self.max_logprobs = max_logprobs
        eos = list(model_config.eos_token_ids)
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int) and tok_eos not in eos:
            eos.append(tok_eos)
        self.eos_token_ids = tuple(eos)

    def tokenize(self, prompt: PromptType) -> ProcessedPrompt:
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                text, ids = prompt["prompt"], None
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, (list, tuple)):
            text, ids = None, list(prompt)
        else:
            raise ValueError(f"prompt: expected a string, token ids or a dict, got {type(prompt).__name__}")
        mm_data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        if ids is None:
            if not isinstance(text, str):
                raise ValueError(f"prompt: expected a string, got {type(text).__name__}")
            if not text:
                raise ValueError("prompt: must not be empty")
            if mm_data is None:
                ids = self.tokenizer.encode(text)
        features: list[MultiModalFeature] = []
        if mm_data is not None:
            if self.multimodal is None:
                raise ValueError(f"multi_modal_data: model {self.model_config.served_model_name} does not take "
                                 f"images (a text-only model)")
            if ids is not None:
                check_prompt_token_ids(ids, self.model_config.vocab_size)
            ids, features = self.multimodal.process(text, None if ids is None else list(ids), mm_data)
        check_prompt_token_ids(ids, self.model_config.vocab_size)
        return ProcessedPrompt(text, list(ids), features)

    def check(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """Returns the effective max_tokens after checking context length and KV capacity."""
        max_len = self.model_config.max_model_len
        if num_prompt_tokens >= max_len:
            raise ValueError(f"prompt: {num_prompt_tokens} prompt tokens leave no room to generate within "
                             f"max_model_len {max_len}")
        max_tokens = params.max_tokens if params.max_tokens is not None else max_len - num_prompt_tokens
        if num_prompt_tokens + max_tokens > max_len:
            raise ValueError(f"max_tokens: {num_prompt_tokens} prompt tokens + max_tokens {max_tokens} = "
                             f"{num_prompt_tokens + max_tokens} exceeds max_model_len {max_len}")
        for field_name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, field_name)
            if value is not None and value > self.max_logprobs:
                raise ValueError(f"{field_name}: at most {self.max_logprobs}, got {value}")
        params.check_vocab(self.model_config.vocab_size)
        if params.bad_words and params._bad_words_token_ids is None:
            params._bad_words_token_ids = tokenize_bad_words(self.tokenizer, params.bad_words)
        bs = self.cache_config.block_size
        need = -(-(num_prompt_tokens + max_tokens) // bs)
        if need > self.cache_config.num_blocks:
            raise ValueError(f"prompt: {num_prompt_tokens} prompt tokens + max_tokens {max_tokens} need {need} KV "
                             f"blocks but the cache holds {self.cache_config.num_blocks}; raise kv_cache_memory")
        return max_tokens

    def make_requests(self, request_id: str, processed: ProcessedPrompt, params: SamplingParams,
                      arrival_time: float | None = None) -> list[Request]:
        prompt_ids, encoder_len, salt, limits = processed.prompt_token_ids, None, None, params
        if self.encoder_decoder is not None:  # the engine prompt holds the encoder input (engine/encoder_decoder.py)
            from llmctl.engine.encoder_decoder import encoder_salt

            if params.prompt_logprobs is not None:
                raise ValueError("prompt_logprobs: not supported for encoder-decoder models (the prompt is the "
                                 "encoder's input, which the decoder does not predict)")
            prompt_ids, encoder_len = self.encoder_decoder.build_prompt(prompt_ids)
            salt = encoder_salt(processed.prompt_token_ids)
            limits = self.encoder_decoder.decoder_params(params, len(prompt_ids), self.model_config.max_model_len)
        max_tokens = self.check(len(prompt_ids), limits)
        compiled = None
        if params.structured_outputs is not None:
            if self.structured is None:
                raise ValueError("structured_outputs: this engine has no grammar backend")
            compiled = self.structured.compile(params.structured_outputs)  # caller's thread, never the engine's
        arrival = arrival_time or time.time()
        requests: list[Request] = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = params.clone(seed=params.seed + i, n=1)
            child_id = request_id if params.n == 1 else f"{i}_{request_id}"
            requests.append(Request(
                request_id=child_id,
                prompt_token_ids=prompt_ids,
                sampling_params=child_params,
                arrival_time=arrival,
                eos_token_ids=self.eos_token_ids,
                max_tokens=max_tokens,
                leader=requests[0] if requests else None,
                grammar=self.structured.request_grammar(compiled, params.structured_outputs)  # type: ignore[union-attr]
                if compiled is not None else None,
                mm_features=processed.mm_features,
                encoder_len=encoder_len,
                cache_salt=salt,
            ))
        return requests
