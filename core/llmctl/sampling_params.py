"""Sampling parameters, with vLLM's field names so code written for vLLM runs unchanged.

All validation of user-supplied sampling values happens here, once, before the engine allocates anything;
every error is a ``ValueError`` that names the field and the limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from llmctl.structured_output.params import StructuredOutputsParams

MAX_LOGPROBS = 20
MAX_N = 128
MAX_LOGIT_BIAS = 100.0
_GREEDY_EPS = 1e-5


def _check_number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False, hi_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: must be a number, got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name}: must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ValueError(f"{name}: must be {'<' if hi_open else '<='} {hi}, got {value}")


def _check_int(name: str, value: Any, *, lo: int | None = None, hi: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name}: must be <= {hi}, got {value}")


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    extra_args: dict[str, Any] | None = None
    # Constrained decoding (JSON schema, regex, choice, EBNF grammar); ``guided_decoding`` is vLLM's older name.
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = field(default=None, repr=False)
    # Token controls (engine/logits_controls.py): token id -> bias added to the logit, in [-100, 100]; the only
    # ids that may be sampled; words never to complete; callables (output_ids, logits) or
    # (prompt_ids, output_ids, logits) -> logits, offline only.
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logits_processors: list[Callable[..., Any]] | None = None
    # Filled by the engine, not the user: EOS ids of the model (generation_config may list several).
    _eos_token_ids: tuple[int, ...] = field(default=(), repr=False)
    # Filled by the engine from ``bad_words`` with the model's tokenizer.
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.guided_decoding is not None and self.structured_outputs is None:
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if isinstance(self.logit_bias, dict):
            self.logit_bias = {_token_key(k): v for k, v in self.logit_bias.items()}
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self.validate()

    def validate(self) -> None:
        _check_int("n", self.n, lo=1, hi=MAX_N)
        if self.best_of is not None:
            _check_int("best_of", self.best_of, lo=self.n, hi=MAX_N)
        _check_number("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_number("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _check_number("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True, hi=10.0)
        _check_number("temperature", self.temperature, lo=0.0, hi=100.0)
        _check_number("top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0)
        _check_int("top_k", self.top_k, lo=0)
        _check_number("min_p", self.min_p, lo=0.0, hi=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=-(2**63), hi=2**64 - 1)
        _check_int("max_tokens", self.max_tokens, lo=1, optional=True)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens: must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check_int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS, optional=True)
        _check_int("prompt_logprobs", self.prompt_logprobs, lo=0, hi=MAX_LOGPROBS, optional=True)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError("stop: every stop string must be a non-empty string")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, lo=0)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs: expected StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")
        self._validate_logits_controls()

    def _validate_logits_controls(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias: must map token ids to biases, got {type(self.logit_bias).__name__}")
            for t, b in self.logit_bias.items():
                _check_int("logit_bias", t, lo=0)
                _check_number(f"logit_bias[{t}]", b, lo=-MAX_LOGIT_BIAS, hi=MAX_LOGIT_BIAS)
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids:
                raise ValueError("allowed_token_ids: must be a non-empty list of token ids")
            self.allowed_token_ids = list(self.allowed_token_ids)
            for t in self.allowed_token_ids:
                _check_int("allowed_token_ids", t, lo=0)
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)):
                raise ValueError("bad_words: must be a list of strings")
            self.bad_words = list(self.bad_words)
            for w in self.bad_words:
                if not isinstance(w, str) or not w.strip():
                    raise ValueError("bad_words: every bad word must be a non-empty string")
        if self.logits_processors is not None:
            if not isinstance(self.logits_processors, (list, tuple)):
                raise ValueError("logits_processors: must be a list of callables")
            self.logits_processors = list(self.logits_processors)
            for fn in self.logits_processors:
                if not callable(fn):
                    raise ValueError(f"logits_processors: {fn!r} is not callable")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the user passed must exist in the model's vocabulary (checked when the model is known)."""
        for name, ids in (("logit_bias", self.logit_bias or {}), ("allowed_token_ids", self.allowed_token_ids or [])):
            for t in ids:
                if t >= vocab_size:
                    raise ValueError(f"{name}: token id {t} is outside the vocabulary (0..{vocab_size - 1})")

    @property
    def has_logits_controls(self) -> bool:
        return bool(self.logit_bias or self.allowed_token_ids or self._bad_words_token_ids or self.logits_processors)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def clone(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)

    @classmethod
    def from_generation_config(cls, gen: dict[str, Any], **overrides: Any) -> SamplingParams:
        """Defaults from a model's generation_config.json (as vLLM's ``generation_config="auto"`` does)."""
        known = {f.name for f in fields(cls)}
        mapping = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
        kwargs: dict[str, Any] = {}
        if gen.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        for src, dst in mapping.items():
            if gen.get(src) is not None and dst in known and not (dst == "temperature" and "temperature" in kwargs):
                kwargs[dst] = gen[src]
        kwargs.update(overrides)
        return cls(**kwargs)


def _token_key(key: Any) -> Any:
    """OpenAI clients send ``logit_bias`` keys as strings of digits; anything else is left for validate()."""
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return key
