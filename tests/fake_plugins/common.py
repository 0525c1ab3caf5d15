"""Small concrete plugin types shared by the fake plugins."""

from __future__ import annotations

import torch
from llmctl.ops.paged_attention import write_kv_reference
from llmctl.plugins.types import AttentionBackend, Platform, ProbeResult, Support


class FakePlatform(Platform):
    device_type = "cpu"
    priority = -100  # never chosen over a real platform by default

    def __init__(self, name: str, available: bool = True, reason: str = "", device_type: str = "cpu",
                 priority: int = -100) -> None:
        self.name = name
        self.device_type = device_type
        self.priority = priority
        self._available = available
        self._reason = reason

    def probe(self) -> ProbeResult:
        return ProbeResult(self._available, self._reason)


class FakeAttention(AttentionBackend):
    def __init__(self, name: str, platform: str, priority: int = 0) -> None:
        self.name = name
        self.platform = platform
        self.priority = priority

    def supports(self, dtype: torch.dtype, head_size: int, block_size: int, features: frozenset[str]) -> Support:
        return Support(True)

    def write_kv(self, key, value, kv_cache, slot_mapping) -> None:
        write_kv_reference(key, value, kv_cache, slot_mapping)

    def forward(self, query, kv_cache, metadata, scale, sliding_window=None, out=None, *, key=None, value=None):
        raise NotImplementedError("never run")
