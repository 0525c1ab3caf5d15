"""OpenAI request/response models (completions, chat completions) plus the vLLM sampling extras.

Scalar fields are strict (``"max_tokens": "5"`` or ``true`` is a 400, not silently coerced) and floats must be
finite. Static ranges live here; limits that depend on the deployment (``n``, the context length, the
vocabulary) are checked by :func:`check_limits` before the request reaches the engine, so nothing is allocated
for a request that will be refused.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from llmctl_server.errors import bad_request

SInt = Annotated[int, Strict()]
SBool = Annotated[bool, Strict()]
SStr = Annotated[str, Strict()]
SFloat = Annotated[float, Strict(), Field(allow_inf_nan=False)]

MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_STOP_LEN = 1000
MAX_LOGIT_BIAS = 100.0
_INT64 = 2**63


class _Model(BaseModel):
    # OpenAI clients send fields we do not use (e.g. "store", "metadata"); accept and ignore them.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Model):
    include_usage: SBool = False
    continuous_usage_stats: SBool = False


def _finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number")


class JsonSchemaFormat(_Model):
    name: SStr = "response"
    description: SStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: SBool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema: required when type is 'json_schema'")
        return self


class StructuredOutputsFields(_Model):
    json_: SStr | dict[str, Any] | None = Field(None, alias="json")
    regex: SStr | None = None
    choice: list[SStr] | None = None
    grammar: SStr | None = None
    json_object: SBool | None = None
    disable_any_whitespace: SBool = False
    disable_additional_properties: SBool = False
    whitespace_pattern: SStr | None = None
    structural_tag: SStr | None = None
    backend: SStr | None = None  # the grammar engine for this request, as guided_decoding_backend


class SamplingFields(_Model):
    """Fields shared by both endpoints. ``None`` means: use the model's generation_config default."""

    model: SStr | None = None
    n: SInt = Field(1, ge=1)
    temperature: SFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: SFloat | None = Field(None, gt=0.0, le=1.0)
    top_k: SInt | None = Field(None, ge=-1)
    min_p: SFloat | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: SFloat | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: SFloat | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: SFloat | None = Field(None, gt=0.0, le=10.0)
    seed: SInt | None = Field(None, ge=-_INT64, lt=_INT64)
    stop: SStr | list[SStr] | None = None
    stop_token_ids: list[SInt] | None = None
    ignore_eos: SBool = False
    min_tokens: SInt = Field(0, ge=0)
    include_stop_str_in_output: SBool = False
    skip_special_tokens: SBool = True
    stream: SBool = False
    stream_options: StreamOptions | None = None
    user: SStr | None = None
    prompt_logprobs: SInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    logit_bias: dict[str, SFloat] | None = None
    allowed_token_ids: list[SInt] | None = None
    bad_words: list[SStr] | None = None
    # vLLM's beam search extension: n is the beam width (llmctl_server/beam.py)
    use_beam_search: SBool = False
    length_penalty: SFloat = 1.0
    # vLLM's per-request extension arguments, handed to SamplingParams.extra_args (also accepted as vllm_xargs).
    extra_args: dict[str, SStr | SInt | SFloat | SBool] | None = None
    vllm_xargs: dict[str, SStr | SInt | SFloat | SBool] | None = None
    # Structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    # (turned into one StructuredOutputsParams by llmctl_server.structured).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsFields | None = None
    guided_json: SStr | dict[str, Any] | None = None
    guided_regex: SStr | None = None
    guided_choice: list[SStr] | None = None
    guided_grammar: SStr | None = None
    guided_whitespace_pattern: SStr | None = None
    guided_decoding_backend: SStr | None = None  # the grammar engine for this request: auto, xgrammar, guidance

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop sequences, got {len(items)}")
        for s in items:
            if not s:
                raise ValueError("stop: stop sequences must be non-empty strings")
            if len(s) > MAX_STOP_LEN:
                raise ValueError(f"stop: each stop sequence is at most {MAX_STOP_LEN} characters, got {len(s)}")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(v) > MAX_STOP:
            raise ValueError(f"stop_token_ids: at most {MAX_STOP} entries, got {len(v)}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias: keys must be token ids, got {key!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias: biases must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got "
                                 f"{bias} for token {key}")
        return v

    def logit_bias_ids(self) -> dict[int, float] | None:
        return {int(k): b for k, b in self.logit_bias.items()} if self.logit_bias else None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _prompt_shape(v: Any) -> str | list[str] | list[int] | list[list[int]]:
    """str | list[str] | list[int] | list[list[int]], with one clear message instead of pydantic's four."""
    shape = "prompt: must be a string, a list of strings, a list of token ids or a list of token-id lists"

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise ValueError(shape)
    if not v:
        raise ValueError("prompt: must not be empty")
    if all(isinstance(x, str) for x in v):
        return v
    if all(is_int(x) for x in v):
        return v
    if all(isinstance(x, list) for x in v):
        for i, inner in enumerate(v):
            if not inner:
                raise ValueError(f"prompt[{i}]: a token-id list must not be empty")
            if not all(is_int(t) for t in inner):
                raise ValueError(f"prompt[{i}]: token ids must be integers")
        return v
    raise ValueError(shape)


class CompletionRequest(SamplingFields):
    prompt: Any
    max_tokens: SInt | None = Field(16, ge=1)
    logprobs: SInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: SBool = False
    suffix: SStr | None = None
    best_of: SInt | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        return _prompt_shape(v)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix: not supported by this server")
        return v

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One engine prompt per entry of a batched ``prompt``."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], str):
            return list(p)
        if p and isinstance(p[0], list):
            return [list(x) for x in p]
        return [list(p)]


class TextContentPart(_Model):
    type: Literal["text"]
    text: SStr


class ImageURL(_Model):
    url: SStr
    detail: Literal["auto", "low", "high"] | None = None


class ImageURLContentPart(_Model):
    """OpenAI's image part: a ``data:`` URL, or an http(s)/file URL the server's media policy allows."""

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextContentPart | ImageURLContentPart, Field(discriminator="type")]


class FunctionCall(_Model):
    name: SStr
    arguments: SStr = "{}"


class ToolCall(_Model):
    id: SStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: SStr | list[ContentPart] | None = None
    name: SStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: SStr | None = None

    def text(self) -> str:
        """Content parts are joined with newlines, which is how multi-part text reads to the model."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if isinstance(part, TextContentPart))

    def image_urls(self) -> list[str]:
        if not isinstance(self.content, list):
            return []
        return [part.image_url.url for part in self.content if isinstance(part, ImageURLContentPart)]


class FunctionDefinition(_Model):
    name: SStr = Field(min_length=1, max_length=256)
    description: SStr | None = None
    parameters: dict[str, Any] | None = None
    strict: SBool | None = None


class ChatTool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Model):
    name: SStr


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: SInt | None = Field(None, ge=1)
    max_completion_tokens: SInt | None = Field(None, ge=1)
    logprobs: SBool = False
    top_logprobs: SInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: SBool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: SBool | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs=true")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Model):
    model: SStr | None = None
    prompt: SStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: SBool = True
    add_generation_prompt: SBool = True

    @model_validator(mode="after")
    def _one_of(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt or messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages: must not be empty")
        return self


class DetokenizeRequest(_Model):
    model: SStr | None = None
    tokens: list[SInt]


# -- responses -----------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob`` as its server returns it in ``prompt_logprobs`` (keyed by token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One entry per prompt token: None for the first (nothing predicts it), else the actual token and the top-k.
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    prompt_logprobs: PromptLogprobs | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmctl"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None
    tasks: list[str] | None = None  # "generate", or the pooling tasks (embed, score, rerank, classify)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


def check_token_ids(ids: list[int], vocab_size: int, field: str) -> None:
    for t in ids:
        if t < 0 or t >= vocab_size:
            raise bad_request(f"{field}: token id {t} is outside the vocabulary [0, {vocab_size})", param=field)


def check_limits(req: SamplingFields, *, max_n: int, max_model_len: int, vocab_size: int) -> None:
    """Deployment-dependent caps, checked before the engine sees the request."""
    if req.n > max_n:
        raise bad_request(f"n: must be <= {max_n}, got {req.n}", param="n")
    new_tokens = req.max_new_tokens() if isinstance(req, ChatCompletionRequest) else req.max_tokens
    if new_tokens is not None and new_tokens > max_model_len:
        name = "max_completion_tokens" if isinstance(req, ChatCompletionRequest) and \
            req.max_completion_tokens is not None else "max_tokens"
        raise bad_request(f"{name}: must be <= the context length {max_model_len}, got {new_tokens}", param=name,
                          code="context_length_exceeded")
    if req.top_k is not None and req.top_k > vocab_size:
        raise bad_request(f"top_k: must be <= the vocabulary size {vocab_size}, got {req.top_k}", param="top_k")
    if req.min_tokens and new_tokens is not None and req.min_tokens > new_tokens:
        raise bad_request(f"min_tokens: must be <= max_tokens ({new_tokens}), got {req.min_tokens}",
                          param="min_tokens")
    if req.stop_token_ids:
        check_token_ids(req.stop_token_ids, vocab_size, "stop_token_ids")
    if req.logit_bias:
        check_token_ids(list(req.logit_bias_ids() or {}), vocab_size, "logit_bias")
    if req.allowed_token_ids is not None:
        if not req.allowed_token_ids:
            raise bad_request("allowed_token_ids: must not be empty", param="allowed_token_ids")
        check_token_ids(req.allowed_token_ids, vocab_size, "allowed_token_ids")
    if isinstance(req, CompletionRequest) and not isinstance(req.prompt, str) and req.prompt:
        if isinstance(req.prompt[0], int):
            check_token_ids(req.prompt, vocab_size, "prompt")
        elif isinstance(req.prompt[0], list):
            for i, ids in enumerate(req.prompt):
                check_token_ids(ids, vocab_size, f"prompt[{i}]")
        if len(req.prompts()) * req.n > max_n * 8:
            raise bad_request(f"prompt: at most {max_n * 8} prompts x n per request, got {len(req.prompts())} x "
                              f"{req.n}", param="prompt")
