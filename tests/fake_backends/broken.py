"""A deliberately wrong backend (platform ``broken-fake``), to prove the testkit catches a broken kernel.

Its attention forgets the causal mask: every query token also attends to the tokens after it in the same
step. Decodes (one new token) are still right, so only a testkit that covers prefill and chunked prefill
notices, which is the point. Everything else (registration, probe, memory) is correct, so the failure report
must name the attention clause and nothing else. Loaded via ``--llmctl-extra-plugin tests.fake_backends.broken``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from llmctl.attention import AttentionMetadata
from llmctl.ops.paged_attention import gather_context, write_kv_reference
from llmctl.plugins import hookimpl
from llmctl.plugins.types import AttentionBackend, Platform, ProbeResult, Support

LLMCTL_API_VERSION = "2.0"


class BrokenFakePlatform(Platform):
    name = "broken-fake"
    device_type = "cpu"
    priority = -50  # never chosen by default

    def probe(self) -> ProbeResult:
        return ProbeResult(True)

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        return 1 << 30, 2 << 30


class NoCausalMaskAttention(AttentionBackend):
    name = "broken-fake-attn"
    platform = "broken-fake"
    priority = 5

    def supports(self, dtype: torch.dtype, head_size: int, block_size: int, features: frozenset[str]) -> Support:
        if "sliding_window" in features:
            return Support(False, "no sliding window")
        return Support(True)

    def write_kv(self, key, value, kv_cache, slot_mapping) -> None:
        write_kv_reference(key, value, kv_cache, slot_mapping)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None, out: torch.Tensor | None = None, *,
                key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.zeros_like(query)
        starts = metadata.query_start_loc.tolist()
        for i, seq_len in enumerate(metadata.seq_lens.tolist()):
            s, e = starts[i], starts[i + 1]
            if e == s:
                continue
            k, v = gather_context(kv_cache, metadata.block_tables[i], seq_len)
            group = query.shape[1] // k.shape[1]
            k = k.repeat_interleave(group, dim=1).float()
            v = v.repeat_interleave(group, dim=1).float()
            probs = (torch.einsum("qhd,khd->hqk", query[s:e].float(), k) * scale).softmax(-1)  # BUG: no mask
            out[s:e] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
        return out


@hookimpl
def llmctl_register_platforms(register: Callable[[Platform], None]) -> None:
    register(BrokenFakePlatform())


@hookimpl
def llmctl_register_attention_backends(register: Callable[[AttentionBackend], None]) -> None:
    register(NoCausalMaskAttention())
