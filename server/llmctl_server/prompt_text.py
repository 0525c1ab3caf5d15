"""Client text on its way to the tokenizer: a length cap checked before any work, and tokenization off the loop.

Tokenizing is linear in the text but not free (seconds for megabytes), and a tokenizer call that ran on the event
loop froze every other client for that long, only to end in a ``context_length_exceeded``. Two rules fix that:

- A prompt of more than ``max_model_len * longest_piece`` characters cannot fit the context: no token covers more
  characters than the longest piece of the vocabulary, so such a prompt needs more than ``max_model_len`` tokens.
  It is refused from its length alone (O(1)), with no false refusals.
- Every tokenizer call runs in a worker thread (the Rust tokenizer releases the GIL while it works), so the loop
  keeps serving the other streams while a long prompt is encoded.

Text that is not valid Unicode (a lone surrogate such as ``"\\ud800"``, which JSON allows) cannot be encoded by the
tokenizer; it is a 400 that names the field, checked in the same worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from llmctl_server.errors import bad_request

T = TypeVar("T")


def longest_piece_chars(tokenizer: Any) -> int:
    """Characters of the longest vocabulary entry (added tokens included): no token covers more text than this.
    Byte-level pieces spell each byte as one character, so the count is also a bound for multi-byte text."""
    longest = 1
    try:
        vocab = tokenizer.get_vocab()
    except Exception:
        vocab = {}
    for piece in vocab:
        if isinstance(piece, str) and len(piece) > longest:
            longest = len(piece)
    for tok in getattr(tokenizer, "all_special_tokens", None) or []:
        if isinstance(tok, str):
            longest = max(longest, len(tok))
    return longest


def max_prompt_chars(tokenizer: Any, max_model_len: int) -> int:
    return max_model_len * longest_piece_chars(tokenizer)


def check_length(num_chars: int, limit: int, field: str) -> None:
    if num_chars > limit:
        raise bad_request(f"{field}: {num_chars} characters cannot fit the context length (at most {limit} "
                          f"characters: max_model_len x the longest token of the vocabulary)", param=field,
                          code="context_length_exceeded")


def check_unicode(text: str, field: str) -> None:
    """A lone surrogate (valid in JSON, not in UTF-8) would make the tokenizer raise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{field}: invalid Unicode: a lone surrogate (U+{ord(text[exc.start]):04X}) at character "
                          f"{exc.start}; send well-formed UTF-16 pairs or UTF-8 text", param=field,
                          code="invalid_value") from None


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run tokenizer work in a worker thread: the event loop keeps serving other requests meanwhile."""
    return await asyncio.to_thread(fn, *args)


def encode_checked(tokenizer: Any, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
    check_unicode(text, field)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


async def encode(tokenizer: Any, text: str, field: str, limit: int, add_special_tokens: bool = True) -> list[int]:
    """Length-checked on the loop (O(1)), Unicode-checked and tokenized in a worker thread."""
    check_length(len(text), limit, field)
    return await off_loop(encode_checked, tokenizer, text, field, add_special_tokens)
