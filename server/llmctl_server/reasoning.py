"""Reasoning parsers (``--reasoning-parser``): split ``<think>...</think>`` output into ``reasoning_content`` and
``content``, for whole texts and for a growing streamed text."""

from __future__ import annotations


class ReasoningParser:
    start = "<think>"
    end = "</think>"
    # Without an end marker: DeepSeek-R1 is still thinking (its template opens the block), Qwen3 never started.
    unterminated_is_reasoning = True

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning, content) of a finished text."""
        reasoning, content, _ = self._split(text, final=True)
        return reasoning, content

    def split_stable(self, text: str) -> tuple[str, str]:
        """(reasoning so far, content so far) of a growing text, holding back a possible partial marker."""
        reasoning, content, _ = self._split(text, final=False)
        return reasoning or "", content

    def _split(self, text: str, final: bool) -> tuple[str | None, str, bool]:
        body = text
        s = body.find(self.start)
        opened = s >= 0 and not body[:s].strip()
        if opened:
            body = body[s + len(self.start):]
        e = body.find(self.end)
        if e >= 0:
            return body[:e], body[e + len(self.end):].lstrip("\n"), True
        if opened or self.unterminated_is_reasoning:
            if final:
                return body, "", False
            return _hold_back(body, self.end), "", False
        if not final and self.start.startswith(text.lstrip()) and text.strip():
            return "", "", False  # might still become "<think>"
        return None, text, False


class DeepSeekR1ReasoningParser(ReasoningParser):
    unterminated_is_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    unterminated_is_reasoning = False


def _hold_back(text: str, marker: str) -> str:
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return text[:-k]
    return text


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    try:
        return REASONING_PARSERS[name]()
    except KeyError:
        raise ValueError(f"reasoning_parser: unknown parser {name!r}; use one of "
                         f"{', '.join(sorted(REASONING_PARSERS))}") from None
