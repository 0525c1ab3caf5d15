"""``speculative_config`` in vLLM's shape, validated once before anything is loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model", "eagle", "eagle3")
SUPPORTED_METHODS = ("ngram", "draft_model", "eagle", "eagle3")
MAX_SPECULATIVE_TOKENS = 16
DEFAULT_PROMPT_LOOKUP = 5
_KNOWN_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model",
               "disable_by_batch_size"}
MAX_DISABLE_BY_BATCH_SIZE = 1 << 20


def _field(name: str) -> str:
    return f"speculative_config.{name}"


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{_field(name)}: must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{_field(name)}: must be in [{lo}, {hi}], got {value}")
    return value


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = DEFAULT_PROMPT_LOOKUP
    prompt_lookup_max: int = DEFAULT_PROMPT_LOOKUP
    model: str | None = None
    # No drafts in a step where at least this many requests decode: a verification step costs about (1 + k) decode
    # steps once the batch is large enough that the forward pass is compute-bound (a CPU at a few streams), so
    # large batches gain more from plain decoding. None: always speculate.
    disable_by_batch_size: int | None = None

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """A dict (offline), a JSON object (``--speculative-config``), or an already parsed config."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config: not a JSON object ({exc.msg})") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: must be a dict, got {type(value).__name__}")
        unknown = sorted(set(value) - _KNOWN_KEYS)
        if unknown:
            raise ValueError(f"{_field(unknown[0])}: unknown key; known: {', '.join(sorted(_KNOWN_KEYS))}")
        model = value.get("model")
        method = value.get("method") or ("draft_model" if model else None)
        if method is None:
            raise ValueError(f"speculative_config.method: required, one of {', '.join(METHODS)}")
        if method not in METHODS:
            raise ValueError(f"speculative_config.method: unknown proposer {method!r}; known: {', '.join(METHODS)}")
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config.num_speculative_tokens: required")
        k = _int("num_speculative_tokens", value["num_speculative_tokens"], 1, MAX_SPECULATIVE_TOKENS)
        lo, hi = value.get("prompt_lookup_min"), value.get("prompt_lookup_max")
        if lo is None and hi is None:
            lo = hi = DEFAULT_PROMPT_LOOKUP
        lo = hi if lo is None else lo
        hi = lo if hi is None else hi
        _int("prompt_lookup_min", lo, 1, 1024)
        _int("prompt_lookup_max", hi, 1, 1024)
        if lo > hi:
            raise ValueError(f"speculative_config.prompt_lookup_min: must be <= prompt_lookup_max ({hi}), got {lo}")
        if method in ("draft_model", "eagle", "eagle3") and not (isinstance(model, str) and model.strip()):
            raise ValueError(f"speculative_config.model: method {method!r} needs the draft model's path")
        if method not in SUPPORTED_METHODS:
            raise ValueError(f"speculative_config.method: {method!r} is not supported yet; use one of "
                             f"{', '.join(SUPPORTED_METHODS)}")
        disable = value.get("disable_by_batch_size")
        if disable is not None:
            _int("disable_by_batch_size", disable, 2, MAX_DISABLE_BY_BATCH_SIZE)
        return cls(method, k, lo, hi, model, disable)
