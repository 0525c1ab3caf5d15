"""Decode steps captured once per padded batch size and replayed (CUDA graphs; hipGraphs on ROCm through the
same ``torch.cuda.CUDAGraph`` API)."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

GRAPH_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _fill_pad(views: Mapping[str, torch.Tensor], n: int, pad_values: Mapping[str, Any],
              extra_rows: Mapping[str, int]) -> None:
    for key, view in views.items():
        live = n + extra_rows.get(key, 0)
        if view.shape[0] > live:
            view[live:].fill_(pad_values.get(key, 0))


class CudaGraphRunner:
    """Capture a decode step once per padded batch size and replay it, removing per-kernel launch overhead.

    ``forward(**inputs)`` must be a pure function of its tensor inputs whose leading dimension is the number of
    decode tokens (``extra_rows`` adds rows for inputs such as ``query_start_loc`` that have ``batch + 1``).
    ``static_inputs`` are buffers sized for the largest batch; a graph reads them in place, so :meth:`run`
    copies the live batch into their leading corner (a live input may be narrower than its buffer in any
    dimension, e.g. a block table of this step's width) and fills the padded tail with ``pad_values`` (e.g.
    slot ``-1`` so padded rows never write the KV cache) or a custom ``pad_fn``. Host-side values baked into a
    capture (grid sizes, the metadata's ``max_seq_len``) must be their worst case during capture.
    ``enforce_eager`` (or no GPU) turns the runner into a plain call of ``forward``.

    The graph API sits behind :meth:`graphs_available`, :meth:`_capture_one` and :meth:`_replay`, so the
    copy-in/pad/replay logic can be exercised with a stand-in where no GPU exists.
    """

    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        static_inputs: Mapping[str, torch.Tensor],
        *,
        batch_sizes: Sequence[int] = GRAPH_BATCH_SIZES,
        max_batch_size: int | None = None,
        extra_rows: Mapping[str, int] | None = None,
        pad_values: Mapping[str, Any] | None = None,
        pad_fn: Callable[[Mapping[str, torch.Tensor], int, int], None] | None = None,
        enforce_eager: bool = False,
        warmup_iters: int = 2,
    ) -> None:
        self.forward = forward
        self.static_inputs = dict(static_inputs)
        self.extra_rows = dict(extra_rows or {})
        self.pad_values = dict(pad_values or {})
        self.pad_fn = pad_fn
        self.warmup_iters = warmup_iters
        capacity = min(t.shape[0] - self.extra_rows.get(k, 0) for k, t in self.static_inputs.items())
        limit = min(capacity, max_batch_size or capacity)
        self.batch_sizes = sorted({b for b in batch_sizes if 0 < b <= limit})
        self.enforce_eager = enforce_eager or not self.graphs_available()
        self.graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self._captured: list[int] = []
        self._pool: Any = None
        self._side: Any = None

    def graphs_available(self) -> bool:
        """Whether this process can capture graphs at all; without it the runner stays eager."""
        return torch.cuda.is_available()

    def _views(self, batch: int) -> dict[str, torch.Tensor]:
        return {k: t[: batch + self.extra_rows.get(k, 0)] for k, t in self.static_inputs.items()}

    def _pad(self, views: Mapping[str, torch.Tensor], n: int, batch: int) -> None:
        if self.pad_fn is not None:
            self.pad_fn(views, n, batch)
        else:
            _fill_pad(views, n, self.pad_values, self.extra_rows)

    def capture(self) -> None:
        """Capture every batch size, largest first, so smaller graphs reuse the largest one's memory pool."""
        if self.enforce_eager:
            return
        self._begin_capture()
        for batch in sorted(self.batch_sizes, reverse=True):
            views = self._views(batch)
            self._pad(views, 0, batch)  # capture on harmless padding values
            self.graphs[batch] = self._capture_one(views)
        self._end_capture()
        self._captured = sorted(self.graphs)
        logger.info("captured decode graphs for batch sizes %s", self._captured)

    def _begin_capture(self) -> None:
        self._pool = torch.cuda.graph_pool_handle()
        self._side = torch.cuda.Stream()

    def _capture_one(self, views: Mapping[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """Warm up outside the capture (Triton compiles and autotunes, lazy allocations happen), then record."""
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):
                self.forward(**views)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.forward(**views)
        return graph, output

    def _end_capture(self) -> None:
        torch.cuda.synchronize()

    def _replay(self, graph: Any) -> None:
        graph.replay()

    def padded_size(self, n: int) -> int | None:
        """The captured batch size a live batch of ``n`` decodes replays with (``None``: run eagerly)."""
        if n < 1 or not self._captured:
            return None
        i = bisect.bisect_left(self._captured, n)
        return self._captured[i] if i < len(self._captured) else None

    def run(self, **inputs: torch.Tensor) -> torch.Tensor:
        first = next(iter(inputs))
        n = inputs[first].shape[0] - self.extra_rows.get(first, 0)
        batch = None if self.enforce_eager else self.padded_size(n)
        if batch is None:
            return self.forward(**inputs)
        graph, output = self.graphs[batch]
        views = self._views(batch)
        for key, value in inputs.items():
            dst = views[key]
            if value.dim() != dst.dim() or any(v > d for v, d in zip(value.shape, dst.shape, strict=True)):
                raise ValueError(f"{key}: live input of shape {tuple(value.shape)} does not fit the captured "
                                 f"buffer {tuple(dst.shape)}")
            dst[tuple(slice(0, size) for size in value.shape)].copy_(value, non_blocking=True)
        self._pad(views, n, batch)
        self._replay(graph)
        return output[:n]
