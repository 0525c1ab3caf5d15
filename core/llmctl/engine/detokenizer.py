"""Incremental detokenization and stop strings.

Text is produced token by token without ever emitting half a UTF-8 character (the tokenizers library's
``DecodeStream`` buffers byte-fallback pieces until they complete). Stop strings may span tokens, so each new
piece is searched together with the tail of the text before it; while a request runs, the last
``max_stop_len - 1`` characters are held back from the visible text because they might begin a stop string.
"""

from __future__ import annotations

from typing import Any

from llmctl.sampling_params import SamplingParams

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # older tokenizers
    DecodeStream = None


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.skip_special = params.skip_special_tokens
        self.text = ""
        self.token_ids: list[int] = []
        self.stop = list(params.stop or [])
        self.matched_stop: str | None = None  # set once a stop string cut the text; nothing is added after it
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        backend = getattr(tokenizer, "_tokenizer", None)
        self._stream = DecodeStream(skip_special_tokens=self.skip_special) if (
            DecodeStream is not None and backend is not None) else None
        self._backend = backend

    def add_tokens(self, token_ids: list[int]) -> str | None:
        """Append tokens; returns the stop string that matched, if any (the text is then cut there)."""
        if not self.params.detokenize:
            self.token_ids.extend(token_ids)
            return None
        before = len(self.text)
        for t in token_ids:
            self.token_ids.append(t)
            if self._stream is not None:
                piece = self._stream.step(self._backend, t)
                if piece:
                    self.text += piece
            else:
                self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special)
        if self.stop and len(self.text) > before:
            return self._check_stop(before)
        return None

    def _check_stop(self, before: int) -> str | None:
        start = max(0, before - self.max_stop_len + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.text = self.text[: idx + len(s)] if self.params.include_stop_str_in_output else self.text[:idx]
        self.matched_stop = s
        return s

    def visible_text(self, finished: bool) -> str:
        if finished or not self.stop or self.params.include_stop_str_in_output:
            return self.text
        hold = self.max_stop_len - 1
        return self.text[: len(self.text) - hold] if hold else self.text

    def finalize(self) -> None:
        """Flush bytes still buffered by the stream decoder (an incomplete character at the very end)."""
        if not self.params.detokenize or self._stream is None or not self.token_ids or self.matched_stop is not None:
            return
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special)
        if full.startswith(self.text) and len(full) > len(self.text):
            before = len(self.text)
            self.text = full
            if self.stop:
                self._check_stop(before)
