"""GPU runtime helpers shared by the CUDA and ROCm plugins: the platform base with core's two GPU seams (KV-cache
sizing by profiling, decode-step graphs), an NCCL communicator, the graph runner and the profiler. ROCm's torch
exposes HIP through the same ``torch.cuda`` API (``torch.cuda.CUDAGraph`` is a hipGraph there and the "nccl"
backend is RCCL), so one implementation serves both.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from llmctl.distributed import TorchDistributedCommunicator
from llmctl.plugins.types import DecodeGraphSpec, Platform, ProbeResult

logger = logging.getLogger(__name__)

GRAPH_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)


GPU_MEMORY_UTILIZATION_ENV = "LLMCTL_GPU_MEMORY_UTILIZATION"
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


def gpu_memory_utilization_from_env() -> float:
    """The share of a GPU the engine may fill (weights, activations and KV cache) when neither
    ``gpu_memory_utilization`` nor ``kv_cache_memory`` is set; an environment variable so a deployment can tune
    it without touching the command line."""
    raw = os.environ.get(GPU_MEMORY_UTILIZATION_ENV)
    if raw is None:
        return DEFAULT_GPU_MEMORY_UTILIZATION
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{GPU_MEMORY_UTILIZATION_ENV}: expected a number in (0, 1], got {raw!r}") from exc
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{GPU_MEMORY_UTILIZATION_ENV}: expected a number in (0, 1], got {raw!r}")
    return value


class TorchCudaPlatform(Platform):
    """What NVIDIA and AMD platforms share through torch's ``cuda`` API (HIP devices are torch "cuda" devices):
    a probe that never raises, memory, synchronisation, dtypes, KV sizing by profiling and decode graphs.
    Subclasses detect the hardware."""

    device_type = "cuda"
    priority = 100
    dist_backend = "nccl"  # RCCL behind the same backend name on ROCm
    vendor = "GPU"

    def probe(self) -> ProbeResult:
        try:
            return self._probe()
        except Exception as exc:  # the contract: never raise from probe
            return ProbeResult(False, f"{self.vendor} detection failed: {type(exc).__name__}: {exc}")

    def _probe(self) -> ProbeResult:
        raise NotImplementedError

    def has_bf16(self) -> bool:
        """Whether device 0 has native bf16 matrix instructions."""
        raise NotImplementedError

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(device_index)
        return int(free), int(total)

    def synchronize(self, device_index: int = 0) -> None:
        torch.cuda.synchronize(device_index)

    def supported_dtypes(self) -> list[torch.dtype]:
        try:
            bf16 = torch.cuda.is_available() and self.has_bf16()
        except Exception:
            bf16 = False
        return ([torch.bfloat16] if bf16 else []) + [torch.float16, torch.float32]

    def configure(self, config: Any) -> dict[str, Any]:
        """Resolve ``LLMCTL_GPU_MEMORY_UTILIZATION`` into the engine's ``gpu_memory_utilization`` here, so a bad
        value fails before the weights load and the value the KV profile uses shows up in core's log."""
        if getattr(config, "kv_cache_memory", None) is None and getattr(config, "gpu_memory_utilization", None) is None:
            return {"gpu_memory_utilization": gpu_memory_utilization_from_env()}
        return {}

    def profile_kv_cache_bytes(
        self,
        run_forward: Callable[[], None],
        *,
        gpu_memory_utilization: float | None,
        bytes_per_block: int,
        block_size: int,
        max_model_len: int,
        device_index: int = 0,
    ) -> int | None:
        """GPU memory is the engine's alone, so the KV cache takes what the card has left at the user's
        utilization after the weights and the worst step's activations (see :func:`profile_kv_cache_size`)."""
        util = gpu_memory_utilization if gpu_memory_utilization is not None else gpu_memory_utilization_from_env()
        return profile_kv_cache_size(run_forward, util, bytes_per_block=bytes_per_block, block_size=block_size,
                                     max_model_len=max_model_len, device=device_index)

    def decode_step_runner(self, spec: DecodeGraphSpec) -> CudaGraphRunner:
        """CUDA graphs on NVIDIA; on ROCm builds ``torch.cuda.CUDAGraph`` records a hipGraph through the same
        API, so AMD GPUs replay decode steps the same way (``enforce_eager`` turns both off)."""
        return CudaGraphRunner(spec.forward, spec.static_inputs, batch_sizes=spec.batch_sizes,
                               extra_rows=spec.extra_rows, pad_fn=spec.pad_fn)


class GpuCommunicator(TorchDistributedCommunicator):
    """Core's torch.distributed communicator with NCCL (RCCL on ROCm): each rank binds its GPU first and hands it
    to ``init_process_group(device_id=...)``, which makes NCCL initialise eagerly instead of hanging lazily."""

    def __init__(self, name: str, platform: str, backend: str = "nccl") -> None:
        super().__init__(name=name, platform=platform, backend=backend)

    def prepare_device(self, rank: int) -> torch.device | None:
        if self.backend != "nccl":
            return None
        if not torch.cuda.is_available():
            raise RuntimeError(f"communicator {self.name!r} needs a GPU: torch.cuda.is_available() is False")
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())


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


@dataclass(frozen=True)
class KvBudget:
    kv_bytes: int
    num_blocks: int | None
    max_concurrency: float | None


def kv_budget(kv_bytes: int, bytes_per_block: int | None = None, block_size: int | None = None,
              max_model_len: int | None = None) -> KvBudget:
    """Blocks and full-length sequences that ``kv_bytes`` holds (what the profile reports to the user)."""
    blocks = kv_bytes // bytes_per_block if bytes_per_block else None
    conc = None
    if blocks is not None and block_size and max_model_len:
        conc = blocks / -(-max_model_len // block_size)
    return KvBudget(kv_bytes, blocks, conc)


def profile_kv_cache_size(
    run_forward: Callable[[], Any],
    gpu_memory_utilization: float = 0.9,
    *,
    bytes_per_block: int | None = None,
    block_size: int | None = None,
    max_model_len: int | None = None,
    device: int | None = None,
) -> int:
    """Bytes left for the KV cache after the model is loaded.

    Runs ``run_forward`` (a forward at the maximum batch the engine will schedule) and takes its peak
    activation memory from ``torch.cuda.max_memory_allocated``. Everything already in use on the device
    (weights, the CUDA context, other processes) comes from ``mem_get_info``. The KV cache gets
    ``total * gpu_memory_utilization`` minus both; the block count and max concurrency are logged.
    """
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {gpu_memory_utilization}")
    if not torch.cuda.is_available():
        raise RuntimeError("profile_kv_cache_size needs a GPU: torch.cuda.is_available() is False")
    dev = torch.cuda.current_device() if device is None else device
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    free_before, total = torch.cuda.mem_get_info(dev)
    baseline = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    run_forward()
    torch.cuda.synchronize(dev)
    activation_peak = torch.cuda.max_memory_allocated(dev) - baseline
    used_before = total - free_before
    kv_bytes = max(0, int(total * gpu_memory_utilization) - used_before - activation_peak)
    budget = kv_budget(kv_bytes, bytes_per_block, block_size, max_model_len)
    logger.info("KV cache profile: total %.2f GiB, in use %.2f GiB, activation peak %.2f GiB -> KV %.2f GiB%s%s",
                total / 2**30, used_before / 2**30, activation_peak / 2**30, kv_bytes / 2**30,
                f", {budget.num_blocks} blocks" if budget.num_blocks is not None else "",
                f", max concurrency {budget.max_concurrency:.1f}x at max_model_len" if budget.max_concurrency
                else "")
    return kv_bytes
