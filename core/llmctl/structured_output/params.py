"""What a request asks the grammar engine for, with vLLM's names (``StructuredOutputsParams``).

Validation here is static (types, exactly one constraint, size caps, keywords the grammar engine cannot enforce);
whether a schema, regex or grammar actually compiles is found out by the backend, off the engine loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmctl.structured_output.limits import (
    MAX_CHOICE_CHARS,
    MAX_CHOICES,
    MAX_GRAMMAR_CHARS,
    MAX_REGEX_CHARS,
    MAX_SCHEMA_BYTES,
    check_json_schema,
    check_regex,
)

_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    json: str | dict[str, Any] | bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    # The grammar engine for this request (vLLM's older per-request choice, ``guided_decoding_backend`` on the
    # server): "auto", "xgrammar" or "guidance"; None takes the engine's --structured-outputs-backend.
    backend: str | None = None
    # With a reasoning model the constraint starts after these tokens (the end of the reasoning, e.g. "</think>").
    reasoning_end_token_ids: list[int] | None = None
    # Where the error message points (the server sets e.g. "response_format.json_schema.schema").
    field_name: str = "structured_outputs"

    def __post_init__(self) -> None:
        self.validate()

    def kind(self) -> str:
        set_kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(f"{self.field_name}: exactly one of json, regex, choice, grammar or json_object must be "
                             f"set, got {', '.join(set_kinds) if set_kinds else 'none'}")
        return set_kinds[0]

    def where(self) -> str:
        """The request field an error points at: ``structured_outputs.json``, or e.g. ``guided_regex`` as is."""
        if self.field_name == "structured_outputs":
            return f"structured_outputs.{self.kind()}"
        return self.field_name

    def validate(self) -> None:
        kind = self.kind()
        where = self.where()
        if kind == "structural_tag":
            raise ValueError(f"{where}: not supported by this server")
        if kind == "json":
            self.json = _schema_object(f"{where}", self.json)
            check_json_schema(self.json, f"{where}")
        elif kind == "regex":
            if not isinstance(self.regex, str) or not self.regex:
                raise ValueError(f"{where}: must be a non-empty string")
            if len(self.regex) > MAX_REGEX_CHARS:
                raise ValueError(f"{where}: at most {MAX_REGEX_CHARS} characters, got {len(self.regex)}")
            check_regex(self.regex, f"{where}")
        elif kind == "choice":
            choice = self.choice
            if not isinstance(choice, (list, tuple)) or not choice:
                raise ValueError(f"{where}: must be a non-empty list of strings")
            if len(choice) > MAX_CHOICES:
                raise ValueError(f"{where}: at most {MAX_CHOICES} choices, got {len(choice)}")
            if not all(isinstance(c, str) and c for c in choice):
                raise ValueError(f"{where}: every choice must be a non-empty string")
            total = sum(len(c) for c in choice)
            if total > MAX_CHOICE_CHARS:
                raise ValueError(f"{where}: at most {MAX_CHOICE_CHARS} characters in all, got {total}")
            self.choice = list(choice)
        elif kind == "grammar":
            if not isinstance(self.grammar, str) or not self.grammar.strip():
                raise ValueError(f"{where}: must be a non-empty EBNF string")
            if len(self.grammar) > MAX_GRAMMAR_CHARS:
                raise ValueError(f"{where}: at most {MAX_GRAMMAR_CHARS} characters, got {len(self.grammar)}")
        elif kind == "json_object" and self.json_object is not True:
            raise ValueError(f"{where}: must be true")
        if self.backend is not None:
            from llmctl.structured_output.backend import check_backend_name

            check_backend_name(self.backend, f"{self.field_name}.backend")
        if self.whitespace_pattern is not None:
            raise ValueError(f"{self.field_name}.whitespace_pattern: not supported by this server")

    def cache_key(self) -> tuple:
        """Identical constraints share one compiled grammar (per backend: the manager adds which)."""
        kind = self.kind()
        if kind == "json":
            spec: Any = json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        elif kind == "choice":
            spec = tuple(self.choice or ())
        else:
            spec = getattr(self, kind)
        return (kind, spec, self.disable_any_whitespace, self.disable_additional_properties)


def _schema_object(name: str, value: Any) -> dict[str, Any] | bool:
    if isinstance(value, str):
        if len(value.encode()) > MAX_SCHEMA_BYTES:
            raise ValueError(f"{name}: the schema is over the cap of {MAX_SCHEMA_BYTES} bytes")
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name}: not valid JSON: {exc}") from None
    if isinstance(value, bool):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name}: a JSON schema must be an object, got {type(value).__name__}")
    return value


# vLLM's older name for the same thing.
GuidedDecodingParams = StructuredOutputsParams
