"""Caps and pre-compile checks on user-supplied schemas, regexes and grammars.

The grammar engine compiles to automata, so a regex like ``(a+)+$`` cannot backtrack; what can hurt is size:
nested bounded repetitions multiply (``(a{1,1000}){1,1000}`` is a million states) and a large schema is a large
grammar. Those are refused here, by estimate, before anything is compiled; the compile timeout catches what the
estimate misses. Keywords the engine would silently ignore are refused too, so an output never "validates"
against a schema that was not really enforced.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
MAX_REGEX_CHARS = 4096
MAX_REGEX_EXPANSION = 100_000
MAX_GRAMMAR_CHARS = 64 * 1024
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 64 * 1024
MAX_BOUNDED_COUNT = 10_000  # maxLength / maxItems / {n,m} bounds that become counted grammar states

# JSON-schema keywords no offered engine enforces (xgrammar ignores them, llguidance refuses them): accepting
# them would promise a constraint that is not applied. What only xgrammar leaves unenforced is refused by
# xgrammar_backend.py, so that "auto" can hand it to llguidance.
UNSUPPORTED_KEYWORDS = frozenset({
    "uniqueItems", "contains", "minContains", "maxContains", "dependentRequired", "dependentSchemas",
    "dependencies", "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef",
    "not", "if", "then", "else",
})
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_VALUES = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else", "propertyNames")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


def check_json_schema(schema: Any, name: str) -> None:
    size = len(json.dumps(schema, separators=(",", ":")).encode())
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"{name}: the schema is {size} bytes, over the cap of {MAX_SCHEMA_BYTES} bytes")
    _walk(schema, name, 0)


def _walk(schema: Any, path: str, depth: int) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"{path}: a schema must be an object or a boolean, got {type(schema).__name__}")
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"{path}: schemas nest deeper than the cap of {MAX_SCHEMA_DEPTH}")
    for key in schema:
        if key in UNSUPPORTED_KEYWORDS and not (key == "uniqueItems" and schema[key] is False):
            raise ValueError(f"{path}: the keyword {key!r} is not supported for structured output")
    for key in _COUNTS:
        value = schema.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{path}.{key}: must be a non-negative integer, got {value!r}")
        if isinstance(value, int) and value > MAX_BOUNDED_COUNT:
            raise ValueError(f"{path}.{key}: {value} is over the cap of {MAX_BOUNDED_COUNT}")
    if "pattern" in schema:
        pattern = schema["pattern"]
        if not isinstance(pattern, str):
            raise ValueError(f"{path}.pattern: must be a string")
        check_regex(pattern, f"{path}.pattern")
    for key in _SCHEMA_MAPS:
        sub = schema.get(key)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ValueError(f"{path}.{key}: must be an object")
        for prop, value in sub.items():
            _walk(value, f"{path}.{key}.{prop}", depth + 1)
    for key in _SCHEMA_VALUES:
        if key in schema and not (key == "items" and isinstance(schema[key], list)):
            _walk(schema[key], f"{path}.{key}", depth + 1)
    for key in (*_SCHEMA_LISTS, "items"):
        sub = schema.get(key)
        if isinstance(sub, list):
            for i, value in enumerate(sub):
                _walk(value, f"{path}.{key}[{i}]", depth + 1)
        elif key != "items" and sub is not None:
            raise ValueError(f"{path}.{key}: must be a list of schemas")


def subschemas(schema: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object node of a schema that ``check_json_schema`` accepted, with its path, the root first."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key in _SCHEMA_MAPS:
        for prop, value in (schema.get(key) or {}).items():
            yield from subschemas(value, f"{path}.{key}.{prop}")
    for key in _SCHEMA_VALUES:
        if key in schema and not isinstance(schema[key], list):
            yield from subschemas(schema[key], f"{path}.{key}")
    for key in (*_SCHEMA_LISTS, "items"):
        if isinstance(schema.get(key), list):
            for i, value in enumerate(schema[key]):
                yield from subschemas(value, f"{path}.{key}[{i}]")


def check_regex(pattern: str, name: str) -> None:
    """Parse with Python's own regex parser (no matching happens) and bound the expanded size."""
    try:
        parsed = re._parser.parse(pattern)  # type: ignore[attr-defined]
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"{name}: invalid regular expression: {exc}") from None
    size = _expansion(parsed, name, False)
    if size > MAX_REGEX_EXPANSION:
        raise ValueError(f"{name}: the regular expression expands to about {size} states, over the cap of "
                         f"{MAX_REGEX_EXPANSION} (nested or large counted repetitions)")


def _expansion(items: Any, name: str, in_unbounded: bool) -> int:
    """Rough state count; also refuses an unbounded repetition inside another (``(a+)+``, ``(x+x+)+y``): the
    grammar engine itself would not backtrack on it, but it is the classic catastrophic-backtracking shape for
    every backtracking regex engine that sees the pattern afterwards (a client validating outputs with it)."""
    from re import _constants as c  # type: ignore[attr-defined]

    total = 0
    for op, arg in items:
        if op is not None and op in (getattr(c, "POSSESSIVE_REPEAT", None), getattr(c, "ATOMIC_GROUP", None)):
            # they give up matches only a backtracking engine would find; an automaton cannot say "a++a" matches
            # nothing, so the output could fail the very regex it was constrained by
            raise ValueError(f"{name}: possessive quantifiers and atomic groups are not supported for structured "
                             "output")
        if op in (c.MAX_REPEAT, c.MIN_REPEAT):
            lo, hi, sub = arg
            unbounded = hi == c.MAXREPEAT
            if unbounded and in_unbounded:
                raise ValueError(f"{name}: nested unbounded repetition (catastrophic backtracking) is not allowed")
            bound = lo if unbounded else hi
            if bound > MAX_BOUNDED_COUNT:
                raise ValueError(f"{name}: a repetition count of {bound} is over the cap of {MAX_BOUNDED_COUNT}")
            total += max(1, bound) * _expansion(sub, name, in_unbounded or unbounded)
        elif op == c.SUBPATTERN:
            total += _expansion(arg[-1], name, in_unbounded)
        elif op == c.BRANCH:
            total += sum(_expansion(b, name, in_unbounded) for b in arg[1])
        elif op in (c.ASSERT, c.ASSERT_NOT):
            raise ValueError(f"{name}: lookaround assertions are not supported for structured output")
        elif op == c.GROUPREF or op == getattr(c, "GROUPREF_EXISTS", None):
            raise ValueError(f"{name}: backreferences are not supported for structured output")
        else:
            total += 1
        if total > MAX_REGEX_EXPANSION:
            return total
    return total
