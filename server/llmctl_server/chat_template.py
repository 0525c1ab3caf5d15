"""Chat templates: sandboxed rendering, and tokenization that keeps message text from becoming control tokens.

A chat template comes from the tokenizer or from ``--chat-template`` and is code a third party wrote, so it runs
in Jinja's immutable sandbox with a deadline, an output-size budget and caps on ``*``/``**``.

Injection: if a user writes ``<|im_end|>`` in a message, tokenizing the rendered prompt normally would turn it
into the real end-of-turn token. We render with a unique placeholder in place of each message's content, then
put the content back while remembering where it lies. The rendered string is then cut into special tokens found
*outside* message content (the template's own markers) and text runs (template text and message content
together); each text run is tokenized with ``split_special_tokens=True``. Since a tokenizer splits on special
tokens before anything else anyway, this gives exactly the ids of ordinary tokenization whenever the content
holds no special-token strings, and plain text ids for those strings when it does.
"""

from __future__ import annotations

import operator
import re
import secrets
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from llmctl_server.errors import APIError, bad_request

RENDER_SECONDS = 2.0
MAX_RENDERED_CHARS = 4_000_000
MAX_REPEAT = 1_000_000


class _BudgetExceeded(Exception):
    pass


class _Env(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus a deadline checked on every call and attribute access, and size caps on the
    operators that can blow up memory in one step."""

    intercepted_binops = frozenset(["*", "**"])

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.deadline = float("inf")

    def _tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _BudgetExceeded("chat template rendering took too long")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self._tick()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self._tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self._tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        self._tick()
        if operator_ == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_REPEAT:
                    raise SecurityError("sequence repetition too large")
            return operator.mul(left, right)
        if operator_ == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise SecurityError("exponent too large")
            return operator.pow(left, right)
        return super().call_binop(context, operator_, left, right)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def load_template_source(value: str | None) -> str | None:
    """``--chat-template``: a file path, or the template text itself."""
    if value is None:
        return None
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError:
        pass
    if "{%" in value or "{{" in value:
        return value
    raise ValueError(f"--chat-template: {value!r} is neither a readable file nor a Jinja template")


class ChatRenderer:
    """Renders messages with the model's chat template and tokenizes the result safely."""

    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        self.tokenizer = tokenizer
        source = template if template is not None else getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):  # some tokenizers keep several named templates
            source = source.get("default") or next(iter(source.values()), None)
        self.source: str | None = source
        self._env = _Env(trim_blocks=True, lstrip_blocks=True)
        self._env.globals.update(raise_exception=_raise_exception,
                                 strftime_now=lambda fmt: datetime.now().strftime(fmt))
        self._template = self._env.from_string(source) if source else None
        specials = []
        for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
            if getattr(tok, "special", False) and tok.content:
                specials.append(tok.content)
        specials += [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(set(specials), key=len, reverse=True))) \
            if specials else None

    @property
    def available(self) -> bool:
        return self._template is not None

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool, extra: dict[str, Any]) -> str:
        assert self._template is not None
        self._env.deadline = time.monotonic() + RENDER_SECONDS
        tok = self.tokenizer
        ctx = dict(extra)
        ctx.update(messages=messages, add_generation_prompt=add_generation_prompt,
                   bos_token=getattr(tok, "bos_token", None) or "", eos_token=getattr(tok, "eos_token", None) or "")
        out: list[str] = []
        size = 0
        try:
            for piece in self._template.generate(**ctx):
                size += len(piece)
                if size > MAX_RENDERED_CHARS:
                    raise bad_request("messages: the chat template produced more than "
                                      f"{MAX_RENDERED_CHARS} characters", param="messages")
                self._env._tick()
                out.append(piece)
        except APIError:
            raise
        except _BudgetExceeded as exc:
            raise bad_request(f"messages: {exc}", param="messages") from None
        except SecurityError as exc:
            raise bad_request(f"messages: the chat template did something unsafe: {exc}", param="messages") from None
        except TemplateError as exc:
            raise bad_request(f"messages: chat template error: {exc}", param="messages") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as exc:
            raise bad_request(f"messages: chat template failed: {type(exc).__name__}: {exc}",
                              param="messages") from None
        finally:
            self._env.deadline = float("inf")
        return "".join(out)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
               extra: dict[str, Any] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """The prompt text and the (start, end) character spans of message content within it."""
        if self._template is None:
            raise bad_request("messages: this model has no chat template; pass --chat-template to the server or "
                              "use /v1/completions", param="messages", code="no_chat_template")
        extra = {k: v for k, v in (extra or {}).items() if k not in ("messages", "add_generation_prompt")}
        nonce = secrets.token_hex(8)
        marks = [f"\uE000{nonce}:{i}\uE001" for i in range(len(messages))]
        masked = [dict(m, content=marks[i]) for i, m in enumerate(messages)]
        skeleton = self._render(masked, add_generation_prompt, extra)
        pattern = re.compile("\uE000" + nonce + r":(\d+)" + "\uE001")
        text_parts: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        length = 0
        for m in pattern.finditer(skeleton):
            literal = skeleton[pos:m.start()]
            text_parts.append(literal)
            length += len(literal)
            content = messages[int(m.group(1))]["content"]
            spans.append((length, length + len(content)))
            text_parts.append(content)
            length += len(content)
            pos = m.end()
        text_parts.append(skeleton[pos:])
        text = "".join(text_parts)
        direct = self._render(messages, add_generation_prompt, extra)
        if direct != text:
            # The template transformed the content (e.g. trimmed it): the placeholder positions do not hold.
            # Fall back to finding each message's (stripped) content in order in the real rendering.
            text, spans, cursor = direct, [], 0
            for msg in messages:
                needle = msg["content"].strip()
                if not needle:
                    continue
                at = direct.find(needle, cursor)
                if at < 0:
                    continue
                spans.append((at, at + len(needle)))
                cursor = at + len(needle)
        return text, spans

    def tokenize(self, text: str, spans: list[tuple[int, int]], image_marker: str | None = None,
                 image_token_id: int | list[int] | None = None) -> list[int]:
        """Token ids of ``text`` where special-token strings count only outside ``spans``; inside them, only the
        request's ``image_marker`` becomes tokens (``image_token_id``: one id, or the ids of a wrapped
        placeholder such as Qwen2-VL's vision start, image pad, vision end)."""
        runs: list[tuple[str, str]] = []  # ("special", tok) | ("text", str)
        buf: list[str] = []
        pos = 0
        bounds = sorted(spans)
        segments: list[tuple[str, bool]] = []  # (text, is_content)
        for start, end in bounds:
            if start > pos:
                segments.append((text[pos:start], False))
            segments.append((text[start:end], True))
            pos = max(pos, end)
        segments.append((text[pos:], False))
        for seg, is_content in segments:
            if is_content and image_marker and image_marker in seg:
                pieces = seg.split(image_marker)
                for k, piece in enumerate(pieces):
                    buf.append(piece)
                    if k < len(pieces) - 1:
                        runs.append(("text", "".join(buf)))
                        buf = []
                        runs.append(("image", ""))
                continue
            if is_content or self._special_re is None:
                buf.append(seg)
                continue
            last = 0
            for m in self._special_re.finditer(seg):
                buf.append(seg[last:m.start()])
                if buf:
                    runs.append(("text", "".join(buf)))
                    buf = []
                runs.append(("special", m.group(0)))
                last = m.end()
            buf.append(seg[last:])
        runs.append(("text", "".join(buf)))
        ids: list[int] = []
        tok = self.tokenizer
        for kind, value in runs:
            if kind == "image":
                ids.extend(int(t) for t in (image_token_id if isinstance(image_token_id, list)
                                            else [image_token_id]))  # type: ignore[union-attr]
            elif kind == "special":
                ids.append(tok.convert_tokens_to_ids(value))
            elif value:
                ids.extend(tok(value, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        return ids

    def prompt_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                   extra: dict[str, Any] | None = None, image_marker: str | None = None,
                   image_token_id: int | list[int] | None = None, image_text: str = "<image>"
                   ) -> tuple[str, list[int]]:
        """With images: ``image_marker`` lines become ``image_token_id`` in the ids and ``image_text`` in the text."""
        text, spans = self.render(messages, add_generation_prompt, extra)
        ids = self.tokenize(text, spans, image_marker, image_token_id)
        if image_marker:
            text = text.replace(image_marker, image_text)
        return text, ids


def safe_encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Tokenize raw completion prompts. Completions prompts are the caller's own text: special-token strings in
    them are honoured, as every OpenAI-compatible server does (the caller controls the whole prompt anyway)."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

