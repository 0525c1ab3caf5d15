"""Render the llmctl Helm chart without the helm binary: ``python deploy/helm/render.py [-f values.yaml] [--set k=v]``.

A substitute for ``helm template`` that implements the part of Go's template language the chart uses (actions
with whitespace trimming, ``if``/``else``/``end``, ``range``, pipelines, parentheses, and the functions in
``FUNCTIONS``). Anything else is an error, so a chart edit that needs more fails loudly here instead of rendering
wrongly; where helm is installed, the tests check that both render the same manifests.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent / "llmctl"
_ACTION = re.compile(r"{{(-?)(.*?)(-?)}}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|\||[^\s()|]+)')


class TemplateError(ValueError):
    pass


# -- values ------------------------------------------------------------------------------------------------------
def truthy(v: Any) -> bool:
    """Go template truth: false, 0, nil, and empty strings, lists and maps are false."""
    return not (v is None or v is False or v == 0 and not isinstance(v, bool) or (hasattr(v, "__len__") and not len(v)))


def to_text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _to_yaml(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True).rstrip("\n").removesuffix("\n...")


def _indent(n: int, s: str) -> str:
    return "\n".join(" " * n + line for line in str(s).split("\n"))


def _required(msg: str, v: Any) -> Any:
    if not truthy(v):
        raise TemplateError(f"execution error: {msg}")
    return v


def _index(collection: Any, *keys: Any) -> Any:
    for k in keys:
        collection = collection.get(k) if isinstance(collection, dict) else collection[int(k)]
    return collection


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "and": lambda *a: next((x for x in a if not truthy(x)), a[-1]),
    "or": lambda *a: next((x for x in a if truthy(x)), a[-1]),
    "not": lambda a: not truthy(a),
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "default": lambda d, v=None: v if truthy(v) else d,
    "quote": lambda v: json.dumps(to_text(v)),
    "toYaml": _to_yaml,
    "nindent": lambda n, s: "\n" + _indent(n, s),
    "indent": _indent,
    "required": _required,
    "printf": lambda fmt, *a: re.sub(r"%[sdv]", "{}", fmt).format(*(to_text(x) for x in a)),
    "add": lambda *a: sum(int(x) for x in a),
    "div": lambda a, b: int(a) // int(b),
    "index": _index,
    "b64enc": lambda s: base64.b64encode(to_text(s).encode()).decode(),
    "int": lambda v: int(v),
}


# -- parsing -----------------------------------------------------------------------------------------------------
@dataclass
class Node:
    kind: str  # text | expr | if | range
    value: str = ""
    body: list[Node] = field(default_factory=list)
    orelse: list[Node] = field(default_factory=list)


def _lex(src: str) -> list[tuple[str, str]]:
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        parts.append(("text", text))
        parts.append(("action", m.group(2).strip()))
        pos = m.end()
        if m.group(3):
            rest = src[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    parts.append(("text", src[pos:]))
    return parts


def parse(src: str) -> list[Node]:
    root: list[Node] = []
    stack: list[tuple[Node | None, list[Node]]] = [(None, root)]
    for kind, value in _lex(src):
        current = stack[-1][1]
        if kind == "text":
            if value:
                current.append(Node("text", value))
            continue
        if value.startswith("/*"):
            continue
        word, _, rest = value.partition(" ")
        if word in ("if", "range"):
            node = Node(word, rest.strip())
            current.append(node)
            stack.append((node, node.body))
        elif word == "else":
            owner = stack[-1][0]
            if owner is None or owner.kind != "if" or rest:
                raise TemplateError(f"unsupported else: {{{{ {value} }}}}")
            stack[-1] = (owner, owner.orelse)
        elif word == "end":
            if len(stack) == 1:
                raise TemplateError("unexpected {{ end }}")
            stack.pop()
        elif word in ("define", "template", "include", "with", "block", "tpl") or ":=" in value:
            raise TemplateError(f"the chart substitute does not support {{{{ {value} }}}}")
        else:
            current.append(Node("expr", value))
    if len(stack) != 1:
        raise TemplateError("missing {{ end }}")
    return root


# -- evaluation ----------------------------------------------------------------------------------------------------
def _tokens(expr: str) -> list[str]:
    out, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise TemplateError(f"cannot parse {expr!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


def _group(tokens: list[str]) -> list[Any]:
    """Nest parenthesised token runs as lists."""
    stack: list[list[Any]] = [[]]
    for t in tokens:
        if t == "(":
            stack.append([])
        elif t == ")":
            inner = stack.pop()
            stack[-1].append(inner)
        else:
            stack[-1].append(t)
    if len(stack) != 1:
        raise TemplateError(f"unbalanced parentheses in {' '.join(tokens)!r}")
    return stack[0]


class Context:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def lookup(self, path: str, dot: Any) -> Any:
        if path == ".":
            return dot
        base = self.root if path.startswith("$") else dot
        for key in path.lstrip("$").strip(".").split("."):
            if not key:
                continue
            base = base.get(key) if isinstance(base, dict) else None
        return base

    def term(self, t: Any, dot: Any) -> Any:
        if isinstance(t, list):
            return self.pipeline(t, dot)
        if t.startswith('"'):
            return json.loads(t)
        if t.startswith((".", "$")):
            return self.lookup(t, dot)
        if t in ("true", "false"):
            return t == "true"
        if t == "nil":
            return None
        if re.fullmatch(r"-?\d+", t):
            return int(t)
        raise TemplateError(f"unknown term {t!r}")

    def command(self, cmd: list[Any], dot: Any, piped: tuple[Any, ...] = ()) -> Any:
        head = cmd[0]
        if isinstance(head, str) and head in FUNCTIONS:
            return FUNCTIONS[head](*[self.term(a, dot) for a in cmd[1:]], *piped)
        if isinstance(head, str) and re.fullmatch(r"[A-Za-z]\w*", head) and head not in ("true", "false", "nil"):
            raise TemplateError(f"the chart substitute has no function {head!r}")
        if len(cmd) != 1 or piped:
            raise TemplateError(f"cannot call {cmd!r}")
        return self.term(head, dot)

    def pipeline(self, grouped: list[Any], dot: Any) -> Any:
        commands: list[list[Any]] = [[]]
        for t in grouped:
            if t == "|":
                commands.append([])
            else:
                commands[-1].append(t)
        value = self.command(commands[0], dot)
        for cmd in commands[1:]:
            value = self.command(cmd, dot, (value,))
        return value

    def eval(self, expr: str, dot: Any) -> Any:
        return self.pipeline(_group(_tokens(expr)), dot)


def execute(nodes: list[Node], ctx: Context, dot: Any) -> str:
    out = []
    for n in nodes:
        if n.kind == "text":
            out.append(n.value)
        elif n.kind == "expr":
            out.append(to_text(ctx.eval(n.value, dot)))
        elif n.kind == "if":
            out.append(execute(n.body if truthy(ctx.eval(n.value, dot)) else n.orelse, ctx, dot))
        elif n.kind == "range":
            items = ctx.eval(n.value, dot) or []
            for item in (items.values() if isinstance(items, dict) else items):
                out.append(execute(n.body, ctx, item))
    return "".join(out)


# -- the chart -----------------------------------------------------------------------------------------------------
def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def set_value(values: dict[str, Any], assignment: str) -> None:
    """``--set a.b=c`` (the value parsed as YAML, as helm does for plain scalars)."""
    path, _, raw = assignment.partition("=")
    keys = path.split(".")
    target = values
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = yaml.safe_load(raw) if raw else ""


def render(values: dict[str, Any] | None = None, release: str = "llmctl", namespace: str = "default",
           chart: Path = CHART) -> dict[str, str]:
    """Template file name -> rendered text (files that render to nothing are left out), as ``helm template``."""
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    merged = merge(yaml.safe_load((chart / "values.yaml").read_text()) or {}, values or {})
    root = {"Values": merged, "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
            "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta.get("appVersion", "")}}
    ctx = Context(root)
    out = {}
    for path in sorted((chart / "templates").glob("*.yaml")):
        text = execute(parse(path.read_text()), ctx, root)
        if text.strip():
            out[path.name] = text
    return out


def manifests(values: dict[str, Any] | None = None, **kw: Any) -> list[dict[str, Any]]:
    docs = []
    for text in render(values, **kw).values():
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-f", "--values", action="append", default=[], help="values file (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="key.path=value (repeatable)")
    ap.add_argument("--release", default="llmctl")
    ap.add_argument("--namespace", default="default")
    args = ap.parse_args(argv)
    values: dict[str, Any] = {}
    for f in args.values:
        values = merge(values, yaml.safe_load(Path(f).read_text()) or {})
    for s in args.set:
        set_value(values, s)
    try:
        rendered = render(values, args.release, args.namespace)
    except TemplateError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    for name, text in rendered.items():
        sys.stdout.write(f"---\n# Source: llmctl/templates/{name}\n{text.strip(chr(10))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
