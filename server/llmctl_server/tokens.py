"""Per-token text and bytes for logprobs.

A token of a byte-level BPE vocabulary may be part of a UTF-8 character, so its "text" is not valid on its
own; OpenAI's chat logprobs carry the raw ``bytes`` for exactly that reason. We recover the bytes from the
vocabulary (GPT-2 byte-to-unicode mapping, or SentencePiece ``<0xAB>`` byte tokens) and fall back to the
decoded text's UTF-8 encoding otherwise.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any


def _byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

# Entries of each per-token cache (text and bytes). A hot set, not the vocabulary: sampled and top-k tokens are
# heavily skewed, so a few thousand entries take almost every lookup, and a miss costs one tokenizer call. Sized
# for the whole vocabulary (65,536) these caches kept growing for as long as new tokens turned up in logprobs,
# by up to ~10 MiB on a 49k vocabulary: RssAnon growth per request on a long soak (docs/reliability.md).
TOKEN_CACHE_ENTRIES = 4096


class TokenText:
    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        decoder = None
        try:
            decoder = type(tokenizer.backend_tokenizer.decoder).__name__
        except Exception:
            pass
        self._byte_level = decoder == "ByteLevel"
        self._bd = _byte_decoder() if self._byte_level else {}
        self.text_of = lru_cache(maxsize=TOKEN_CACHE_ENTRIES)(self._text)
        self.bytes_of = lru_cache(maxsize=TOKEN_CACHE_ENTRIES)(self._bytes)

    def _text(self, tid: int) -> str:
        return self.tok.decode([tid], skip_special_tokens=False)

    def _bytes(self, tid: int) -> tuple[int, ...]:
        try:
            piece = self.tok.convert_ids_to_tokens(tid)
        except Exception:
            piece = None
        if isinstance(piece, str):
            if self._byte_level and all(ch in self._bd for ch in piece):
                return tuple(self._bd[ch] for ch in piece)
            m = _SP_BYTE.match(piece)
            if m:
                return (int(m.group(1), 16),)
        return tuple(self._text(tid).encode("utf-8"))

    def text(self, tid: int, position: dict[int, Any] | None = None) -> str:
        if position is not None:
            entry = position.get(tid)
            decoded = getattr(entry, "decoded_token", None)
            if decoded is not None:
                return decoded
        return self.text_of(tid)

    def bytes(self, tid: int) -> list[int]:
        return list(self.bytes_of(tid))

    @staticmethod
    def ranked(position: dict[int, Any], k: int) -> list[tuple[int, Any]]:
        """The ``k`` most likely entries of one position (by rank, then logprob)."""
        if k <= 0:
            return []
        items = sorted(position.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                          -kv[1].logprob))
        return items[:k]
