"""The seam between the engine and a grammar engine (xgrammar, or llguidance as ``guidance``). A backend
compiles a request's constraint once and hands out one matcher per sequence; matchers fill rows of a shared
token bitmask: int32 words, bit ``t % 32`` of word ``t // 32`` set when token ``t`` is allowed (the
layout xgrammar and llguidance both use)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from llmctl.structured_output.params import StructuredOutputsParams


@runtime_checkable
class GrammarMatcher(Protocol):
    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar does not allow it."""

    def validate_tokens(self, token_ids: list[int]) -> int:
        """How many of ``token_ids``, from the first, the grammar allows in a row; the state does not change."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]``."""

    def is_terminated(self) -> bool:
        """True once the grammar has accepted a stop token."""

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (for rejected speculative tokens)."""


class GrammarBackend(Protocol):
    name: str

    def compile(self, params: StructuredOutputsParams) -> Any:
        """A compiled grammar (raises ``ValueError`` naming the field when the constraint is invalid)."""

    def compiled_size(self, compiled: Any) -> int:
        """Bytes the compiled grammar holds, for the cache's bound."""

    def matcher(self, compiled: Any) -> GrammarMatcher:
        ...


# vLLM's names. "auto" is xgrammar, and llguidance for a constraint xgrammar cannot compile (manager.py).
# outlines is not offered: see docs/serving.md.
BACKENDS = ("xgrammar", "guidance")
BACKEND_CHOICES = ("auto", *BACKENDS)


def check_backend_name(name: Any, field: str = "structured_outputs_backend") -> str:
    if name not in BACKEND_CHOICES:
        raise ValueError(f"{field}: unknown backend {name!r}; use one of {', '.join(BACKEND_CHOICES)}")
    return name


def make_backend(name: str, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> GrammarBackend:
    """One concrete engine; ``auto`` is not one (the manager resolves it per constraint)."""
    if name not in BACKENDS:
        raise ValueError(f"structured_outputs_backend: no grammar engine is named {name!r}; "
                         f"use one of {', '.join(BACKENDS)}")
    if name == "guidance":
        try:
            from llmctl.structured_output.guidance_backend import GuidanceBackend
        except ImportError as exc:  # pragma: no cover - llguidance is a core dependency
            raise ValueError(f"structured_outputs_backend: guidance needs the llguidance package ({exc})") from None
        return GuidanceBackend(tokenizer, vocab_size, stop_token_ids)
    from llmctl.structured_output.xgrammar_backend import XGrammarBackend

    return XGrammarBackend(tokenizer, vocab_size, stop_token_ids)


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def resolve_backend_options(args: Any) -> str:
    """The backend from any of vLLM's spellings on ``EngineArgs``: ``structured_outputs_backend``,
    ``structured_outputs_config={"backend": ..., "disable_fallback": ...}`` (dict or JSON) and the older
    ``guided_decoding_backend``.
    Two spellings that name different backends are refused rather than one silently winning."""
    import json

    named: dict[str, str] = {}
    if args.structured_outputs_backend not in (None, "auto"):
        named["structured_outputs_backend"] = check_backend_name(args.structured_outputs_backend)
    cfg = args.structured_outputs_config
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except json.JSONDecodeError as exc:
            raise ValueError(f"structured_outputs_config: not a JSON object ({exc.msg})") from None
    if cfg is not None:
        if not isinstance(cfg, dict):
            raise ValueError(f"structured_outputs_config: must be an object, got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - {"backend", "disable_fallback"})
        if unknown:
            raise ValueError(f"structured_outputs_config.{unknown[0]}: not supported; only 'backend' and "
                             "'disable_fallback' are")
        if cfg.get("backend") not in (None, "auto"):
            named["structured_outputs_config.backend"] = check_backend_name(
                cfg["backend"], "structured_outputs_config.backend")
        no_fallback = cfg.get("disable_fallback", False)
        if not isinstance(no_fallback, bool):
            raise ValueError(f"structured_outputs_config.disable_fallback: must be true or false, got {no_fallback!r}")
    if args.guided_decoding_backend not in (None, "auto"):
        named["guided_decoding_backend"] = check_backend_name(args.guided_decoding_backend, "guided_decoding_backend")
    if len(set(named.values())) > 1:
        fields = ", ".join(f"{k}={v!r}" for k, v in named.items())
        raise ValueError(f"structured_outputs_backend: conflicting backends ({fields})")
    chosen = next(iter(named.values()), "auto")
    # auto without its fallback is xgrammar alone
    return "xgrammar" if chosen == "auto" and cfg is not None and cfg.get("disable_fallback") else chosen
