"""llguidance (``--structured-outputs-backend guidance``) behind the ``GrammarBackend`` seam.

llguidance builds its token masks lazily from a lexer and an Earley parser, so there is no whole-grammar
compile to cache: ``compile`` checks the grammar once (errors become a ``ValueError`` naming the field) and
keeps its serialized form, and each sequence gets its own ``LLMatcher`` over it. Grammars (``grammar``) are
Lark, llguidance's own syntax (GBNF/EBNF text is converted by llguidance where it can be). Every step of a
matcher is bounded by llguidance's own lexer and parser fuel, so a grammar cannot make a step unbounded.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from llmctl.structured_output.params import StructuredOutputsParams


class GuidanceMatcher:
    __slots__ = ("_m",)

    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def accept_token(self, token_id: int) -> bool:
        return bool(self._m.consume_token(token_id)) and not self._m.is_error()

    def validate_tokens(self, token_ids: list[int]) -> int:
        return int(self._m.validate_tokens(token_ids))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._m, bitmask, row)

    def is_terminated(self) -> bool:
        return bool(self._m.is_stopped())

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._m.rollback(num_tokens)


class GuidanceBackend:
    name = "guidance"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                       eos_token=list(stop_token_ids) or None)

    def compile(self, params: StructuredOutputsParams) -> str:
        llg = self._llg
        kind = params.kind()
        field = params.where()
        whitespace = {"whitespace_flexible": not params.disable_any_whitespace}
        try:
            if kind == "json":
                schema = params.json
                if schema is True:
                    schema = {}
                if params.disable_additional_properties and isinstance(schema, dict):
                    schema = _no_additional_properties(schema)
                grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=whitespace)
            elif kind == "json_object":
                grammar = llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=whitespace)
            elif kind == "regex":
                grammar = llg.grammar_from("regex", params.regex)
            elif kind == "choice":
                grammar = llg.grammar_from("lark", choice_lark(params.choice or []))
            elif kind == "grammar":
                grammar = llg.grammar_from("grammar", params.grammar)
            else:
                raise ValueError(f"{kind} is not supported by the guidance backend")
            error = llg.LLMatcher.validate_grammar(grammar, self._tokenizer)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"{field}: {_clean(exc)}") from None
        if error:
            raise ValueError(f"{field}: {_clean(error)}")
        return grammar

    def compiled_size(self, compiled: Any) -> int:
        return len(compiled)

    def matcher(self, compiled: Any) -> GuidanceMatcher:
        matcher = self._llg.LLMatcher(self._tokenizer, compiled, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs: {_clean(matcher.get_error())}")
        return GuidanceMatcher(matcher)


def choice_lark(choices: list[str]) -> str:
    """``start: "a" | "b"``: each choice a Lark string literal (JSON escaping is valid there)."""
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _no_additional_properties(schema: Any) -> Any:
    """``disable_additional_properties``: objects that do not say otherwise take no extra keys."""
    if isinstance(schema, list):
        return [_no_additional_properties(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _no_additional_properties(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _clean(exc: BaseException | str) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]
