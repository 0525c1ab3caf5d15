"""A CPU platform that implements core's two GPU seams, so the engine's use of them is tested without a GPU.

* KV sizing: ``profile_kv_cache_bytes`` runs core's ``run_forward`` (the attention backend records what that
  step looked like) and answers a byte count the test chose.
* Decode graphs: ``decode_step_runner`` returns the real ``CudaGraphRunner`` with its graph API swapped for a
  stand-in: "capture" runs the step once on the padded static views and keeps its output buffer, "replay" runs
  it again on the same views and writes into that buffer. Everything else (copying live inputs into static
  buffers, padding, picking the padded size, the eager fallback) is the production code path.

Built per test from :class:`SeamsPlugin` and installed with ``PluginManager().load(extra=...)``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from llmctl.attention import AttentionMetadata
from llmctl.ops.paged_attention import paged_attention_reference, write_kv_reference
from llmctl.plugins import hookimpl
from llmctl.plugins.types import AttentionBackend, DecodeGraphSpec, Platform, ProbeResult, Support
from llmctl_gpu.graph_runner import CudaGraphRunner

PLATFORM = "seams"


@dataclass
class Event:
    """One ``write_kv`` or ``forward`` call as the backend saw it."""

    kind: str  # "write" or "forward"
    phase: str  # "profile", "capture", "replay" or "eager"
    rows: int
    num_seqs: int = 0
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # the non-negative slots written
    kv_blocks: int = 0
    kv_ref: Any = None


class RecordingAttention(AttentionBackend):
    """The torch reference, recording every call; capture-safe by declaration (its replays are re-runs)."""

    name = "seams-attn"
    platform = PLATFORM
    priority = 5

    def __init__(self, graph_safe: bool = True) -> None:
        self.supports_graph_capture = graph_safe
        self.phase = "eager"
        self.events: list[Event] = []

    def supports(self, dtype: torch.dtype, head_size: int, block_size: int, features: frozenset[str]) -> Support:
        return Support(True)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        slots = [s for s in slot_mapping.tolist() if s >= 0]
        self.events.append(Event("write", self.phase, int(slot_mapping.shape[0]), slots=slots,
                                 kv_blocks=int(kv_cache.shape[1]), kv_ref=weakref.ref(kv_cache)))
        write_kv_reference(key, value, kv_cache, slot_mapping)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None, out: torch.Tensor | None = None, *,
                key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
        qsl = metadata.query_start_loc.tolist()
        self.events.append(Event("forward", self.phase, int(query.shape[0]), metadata.num_seqs,
                                 [b - a for a, b in zip(qsl, qsl[1:])], metadata.seq_lens.tolist(),
                                 kv_blocks=int(kv_cache.shape[1]), kv_ref=weakref.ref(kv_cache)))
        return paged_attention_reference(query, kv_cache, metadata, scale, sliding_window, out)

    def written_slots(self, phases: tuple[str, ...] = ("eager", "replay")) -> list[list[int]]:
        """Per ``write_kv`` call that wrote anything, the sorted slots: what the KV cache saw, step by step."""
        return [sorted(e.slots) for e in self.events if e.kind == "write" and e.phase in phases and e.slots]


class RerunGraphRunner(CudaGraphRunner):
    """``CudaGraphRunner`` with a CPU stand-in for the graph API (see the module docstring)."""

    def __init__(self, attention: RecordingAttention, *args: Any, **kwargs: Any) -> None:
        self.attention = attention
        self.replays: list[tuple[int, int]] = []  # (live batch, padded size)
        self.padding_seen: list[tuple[list[int], list[int]]] = []  # (slots, seq_lens) of the padded rows
        self.captured_sizes: list[int] = []
        super().__init__(*args, **kwargs)

    def graphs_available(self) -> bool:
        return True

    def _begin_capture(self) -> None:
        self.attention.phase = "capture"

    def _capture_one(self, views: Mapping[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
        self.captured_sizes.append(int(views["input_ids"].shape[0]))
        output = self.forward(**views).clone()  # the buffer a real graph would write on every replay
        return (dict(views), output), output

    def _end_capture(self) -> None:
        self.attention.phase = "eager"

    def _replay(self, graph: Any) -> None:
        views, output = graph
        self.attention.phase = "replay"
        try:
            output.copy_(self.forward(**views))
        finally:
            self.attention.phase = "eager"

    def run(self, **inputs: torch.Tensor) -> torch.Tensor:
        n = int(inputs["input_ids"].shape[0])
        batch = self.padded_size(n)
        result = super().run(**inputs)
        if batch is not None:
            self.replays.append((n, batch))
            self.padding_seen.append((self.static_inputs["slot_mapping"][n:batch].tolist(),
                                      self.static_inputs["seq_lens"][n:batch].tolist()))
        return result


class SeamsPlatform(Platform):
    name = PLATFORM
    device_type = "cpu"
    priority = -100  # only when asked for by name

    def __init__(self, attention: RecordingAttention, profile_bytes: int | None = None,
                 graphs: bool = True, graph_max_batch: int | None = None) -> None:
        self.attention = attention
        self.profile_bytes = profile_bytes
        self.graphs = graphs
        self.graph_max_batch = graph_max_batch
        self.profile_calls: list[dict[str, Any]] = []
        self.runner_requests: list[DecodeGraphSpec] = []
        self.runner: RerunGraphRunner | None = None

    def probe(self) -> ProbeResult:
        return ProbeResult(True)

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        return 1 << 30, 2 << 30

    def profile_kv_cache_bytes(self, run_forward: Callable[[], None], **kwargs: Any) -> int | None:
        self.profile_calls.append(kwargs)
        if self.profile_bytes is None:
            return None
        self.attention.phase = "profile"
        try:
            run_forward()
        finally:
            self.attention.phase = "eager"
        return self.profile_bytes

    def decode_step_runner(self, spec: DecodeGraphSpec) -> RerunGraphRunner | None:
        self.runner_requests.append(spec)
        if not self.graphs:
            return None
        self.runner = RerunGraphRunner(self.attention, spec.forward, spec.static_inputs,
                                       batch_sizes=spec.batch_sizes, max_batch_size=self.graph_max_batch,
                                       extra_rows=spec.extra_rows, pad_fn=spec.pad_fn, warmup_iters=0)
        return self.runner


class SeamsPlugin:
    """A plugin object (not a module) so each test registers fresh, configurable instances."""

    LLMCTL_API_VERSION = "2.0"

    def __init__(self, platform: SeamsPlatform) -> None:
        self.platform = platform

    @hookimpl
    def llmctl_register_platforms(self, register: Callable[[Platform], None]) -> None:
        register(self.platform)

    @hookimpl
    def llmctl_register_attention_backends(self, register: Callable[[AttentionBackend], None]) -> None:
        register(self.platform.attention)
