"""Encoder outputs by image content hash, least recently used out first, under a byte budget.

A prompt is often computed in several chunks (chunked prefill), recomputed after a preemption, or sent again with
the same image; each of those reads the image's rows from here instead of running the vision tower again.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

DEFAULT_ENCODER_CACHE_BYTES = 256 << 20


class EncoderCache:
    def __init__(self, max_bytes: int = DEFAULT_ENCODER_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        """An entry larger than the whole budget is not kept (the caller still has it for this step)."""
        size = value.numel() * value.element_size()
        if key in self._entries or size > self.max_bytes:
            return
        self._entries[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._entries)
