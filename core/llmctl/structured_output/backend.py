"""The seam between the engine and a grammar engine (xgrammar today; llguidance or outlines-core would plug in
here). A backend compiles a request's constraint once and hands out one matcher per sequence; matchers fill rows
of a shared token bitmask: int32 words, bit ``t % 32`` of word ``t // 32`` set when token ``t`` is allowed (the
layout xgrammar and llguidance both use)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from llmctl.structured_output.params import StructuredOutputsParams


@runtime_checkable
class GrammarMatcher(Protocol):
    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar does not allow it."""

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


BACKENDS = ("xgrammar",)


def make_backend(name: str, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> GrammarBackend:
    if name in ("auto", "xgrammar"):
        from llmctl.structured_output.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(tokenizer, vocab_size, stop_token_ids)
    raise ValueError(f"structured_outputs_backend: unknown backend {name!r}; use one of auto, {', '.join(BACKENDS)}")


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32
