"""xgrammar behind the ``GrammarBackend`` seam."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from llmctl.structured_output.limits import subschemas
from llmctl.structured_output.params import StructuredOutputsParams

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the client only needs the message.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


class XGrammarMatcher:
    __slots__ = ("_m",)

    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def accept_token(self, token_id: int) -> bool:
        return bool(self._m.accept_token(token_id))

    def validate_tokens(self, token_ids: list[int]) -> int:
        n = 0
        for token in token_ids:  # a refused token leaves the state as it was
            if not self._m.accept_token(token):
                break
            n += 1
        if n:
            self._m.rollback(n)
        return n

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return bool(self._m.is_terminated())

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids) or None)
        # The manager keeps its own bounded cache; xgrammar's would be a second, unbounded one.
        self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False)

    def compile(self, params: StructuredOutputsParams) -> Any:
        kind = params.kind()
        field = params.where()
        if kind == "json" and params.json is not True:
            unenforced = unenforced_keywords(params.json, field)
            if unenforced:
                raise ValueError(f"{unenforced} (xgrammar would not enforce it)")
        try:
            if kind == "json":
                schema = params.json
                if schema is True:
                    return self._compiler.compile_builtin_json_grammar()
                return self._compiler.compile_json_schema(
                    json.dumps(_counted_strings_as_patterns(schema)), any_whitespace=not params.disable_any_whitespace,
                    strict_mode=params.disable_additional_properties)
            if kind == "json_object":
                return self._compiler.compile_builtin_json_grammar()
            if kind == "regex":
                anchor = _string_anchor(params.regex or "")
                if anchor:
                    raise ValueError(f"{anchor} is not supported (use ^ and $)")
                return self._compiler.compile_regex(params.regex)
            if kind == "choice":
                return self._compiler.compile_grammar(choice_ebnf(params.choice or []))
            if kind == "grammar":
                return self._compiler.compile_grammar(params.grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"{field}: {_clean(exc)}") from None
        raise ValueError(f"{params.field_name}: {kind} is not supported by the xgrammar backend")

    def compiled_size(self, compiled: Any) -> int:
        return int(getattr(compiled, "memory_size_bytes", 0) or 0)

    def matcher(self, compiled: Any) -> XGrammarMatcher:
        return XGrammarMatcher(self._xgr.GrammarMatcher(compiled))


# Keywords that only describe: they constrain nothing, so xgrammar may ignore them next to anything.
# ``discriminator`` (OpenAPI, written by Pydantic beside ``oneOf``) names the property that already tells the
# branches apart.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id", "$anchor",
                          "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "contentEncoding",
                          "contentMediaType", "format", "discriminator"})
_JSON_TYPES = {"null": lambda v: v is None, "boolean": lambda v: isinstance(v, bool),
               "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
               "string": lambda v: isinstance(v, str),
               "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
               "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
               or (isinstance(v, float) and v.is_integer())}


def unenforced_keywords(schema: Any, field: str) -> str | None:
    """Where a schema uses something xgrammar's converter accepts but does not enforce (found by probing
    xgrammar 0.2.9): ``multipleOf`` on non-integers, ``allOf`` beside anything, keywords beside ``anyOf`` /
    ``oneOf`` or beside ``enum`` / ``const``, and a string length beside a ``pattern`` or ``format``. Such a
    schema is refused here rather than served with a weaker constraint; under ``auto`` llguidance takes it."""
    for path, node in subschemas(schema, field):
        constraining = set(node) - _ANNOTATIONS
        if "multipleOf" in node and node.get("type") != "integer":
            return f"{path}.multipleOf: only supported on integers"
        if "allOf" in node and (len(node["allOf"]) != 1 or constraining - {"allOf"}):
            return f"{path}.allOf: combining subschemas is not supported"
        for key in ("anyOf", "oneOf"):
            if key in node and constraining - {key}:
                return f"{path}.{key}: keywords beside {key} ({', '.join(sorted(constraining - {key}))}) " \
                       "are not supported"
        for key in ("enum", "const"):
            if key not in node:
                continue
            if constraining - {key, "type"}:
                return f"{path}.{key}: keywords beside {key} ({', '.join(sorted(constraining - {key}))}) " \
                       "are not supported"
            values = node[key] if key == "enum" else [node[key]]
            types = node.get("type")
            types = [types] if isinstance(types, str) else types
            if types and isinstance(values, list) and not all(
                    any(_JSON_TYPES.get(t, lambda v: False)(v) for t in types) for v in values):
                return f"{path}.{key}: a value that is not of the schema's type is not supported"
        if ({"pattern", "format"} & set(node)) and ({"minLength", "maxLength"} & set(node)):
            return f"{path}: minLength/maxLength beside a pattern or format is not supported"
        for where, pattern in [(f"{path}.pattern", node.get("pattern")),
                               *((f"{path}.patternProperties", p) for p in node.get("patternProperties") or ())]:
            if isinstance(pattern, str) and _string_anchor(pattern):
                return f"{where}: {_string_anchor(pattern)} is not supported"
    return None


def _string_anchor(pattern: str) -> str | None:
    """xgrammar reads ``\\A`` and ``\\Z`` as the letters A and Z (with a warning only): a different language."""
    i = 0
    while i < len(pattern) - 1:
        if pattern[i] == "\\":
            if pattern[i + 1] in "AZ":
                return f"the anchor \\{pattern[i + 1]}"
            i += 2
        else:
            i += 1
    return None


def _counted_strings_as_patterns(schema: Any) -> Any:
    """xgrammar's rule for strings with minLength/maxLength lets raw control characters through (which JSON
    forbids); the same bound written as a pattern over JSON's plain string characters does not."""
    if isinstance(schema, list):
        return [_counted_strings_as_patterns(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _counted_strings_as_patterns(v) for k, v in schema.items()}
    if out.get("type") == "string" and ("minLength" in out or "maxLength" in out) and \
            not any(k in out for k in ("pattern", "format", "enum", "const")):
        lo = out.pop("minLength", 0)
        hi = out.pop("maxLength", "")
        out["pattern"] = "^" + r'[^\x00-\x1f"\\]' + f"{{{lo},{hi}}}$"
    return out


def choice_ebnf(choices: list[str]) -> str:
    """``root ::= "a" | "b"``: each choice as an EBNF string literal (JSON escaping is valid there)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _clean(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = _CPP_PREFIX.sub("", text[0]) if text else type(exc).__name__
    return first[:500]
