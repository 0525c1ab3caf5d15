"""The types a plugin registers. They are the whole surface a backend author implements.

A plugin never subclasses engine classes; it fills these in and hands them to the ``register`` callbacks
that the hooks in :mod:`llmctl.plugins.hookspecs` receive. Everything here is plain data or a small abstract
class whose methods are kernel calls, so a vendor can implement it without reading the engine.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmctl.attention import AttentionMetadata


@dataclass(frozen=True)
class DeviceInfo:
    """One device a platform found; ``capabilities`` is free-form (ISA flags, compute capability, ...)."""

    index: int
    name: str
    total_memory: int | None = None
    free_memory: int | None = None
    capabilities: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProbeResult:
    """Whether a platform can run here. ``reason`` explains a ``False`` in words a user can act on."""

    available: bool
    reason: str = ""
    devices: tuple[DeviceInfo, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Support:
    """Answer of ``AttentionBackend.supports``; falsy with a reason when the combination is not handled."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


class Platform(abc.ABC):
    """An accelerator family. Core picks the highest-priority platform whose ``probe()`` says available."""

    name: str = ""
    device_type: str = "cpu"  # the torch device type, e.g. "cpu", "cuda", "xpu", "xla"
    priority: int = 0
    dist_backend: str = "gloo"

    @abc.abstractmethod
    def probe(self) -> ProbeResult:
        """Detect the hardware. Must never raise: return ``ProbeResult(False, reason)`` instead."""

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        """(free bytes, total bytes) on one device; core sizes the KV cache from it."""
        raise NotImplementedError(f"platform {self.name!r} does not report memory")

    def synchronize(self, device_index: int = 0) -> None:
        """Wait for queued work on the device (a no-op for synchronous devices)."""

    def supported_dtypes(self) -> list[torch.dtype]:
        """Dtypes this platform runs, fastest first; ``dtype="auto"`` falls back along this list."""
        return [torch.float32]

    def configure(self, config: Any) -> dict[str, Any]:
        """Return the engine-config changes this platform wants (field -> value). Core applies and logs them;
        the platform does not mutate ``config`` itself, so every change is visible in one place."""
        return {}

    def torch_device(self, device_index: int = 0) -> torch.device:
        return torch.device(self.device_type if self.device_type == "cpu" else f"{self.device_type}:{device_index}")


class AttentionBackend(abc.ABC):
    """Paged attention for one platform.

    The KV cache of one layer is a single tensor whose shape the backend chooses (``kv_cache_shape``).
    Core only ever touches it through ``write_kv`` and ``forward``, so the layout is the backend's business.
    """

    name: str = ""
    platform: str = ""
    priority: int = 0
    #: When True, core also passes this step's new keys/values to ``forward`` as keyword arguments ``key`` and
    #: ``value`` ([num_tokens, num_kv_heads, head_size], the tensors just given to ``write_kv``), so a backend
    #: can attend over a prefill chunk without reading it back from the cache. Backends that leave this False
    #: never see the extra arguments.
    accepts_new_kv: bool = False

    @abc.abstractmethod
    def supports(self, dtype: torch.dtype, head_size: int, block_size: int, features: frozenset[str]) -> Support:
        """Whether this backend handles the combination. ``features`` may hold "sliding_window",
        "prefix_caching", "chunked_prefill", "alibi", ... Return ``Support(False, reason)`` otherwise."""

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """Shape of one layer's KV tensor. The default is ``[2, num_blocks, block_size, num_kv_heads, head_size]``
        (keys at index 0, values at 1), the layout of the torch reference."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @abc.abstractmethod
    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Store ``key``/``value`` ([num_tokens, num_kv_heads, head_size]) at flat slots ``slot_mapping``
        ([num_tokens], ``block * block_size + offset``; ``-1`` means skip this token)."""

    @abc.abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of ``query`` ([num_tokens, num_heads, head_size]) over each sequence's cached
        context. The batch is core's flattened mix of prefill chunks and decodes described by ``metadata``; the
        new tokens' K/V have already been written with ``write_kv``. Returns [num_tokens, num_heads, head_size]
        (into ``out`` when given). Must give the same result for a sequence whatever else is in the batch."""


@dataclass(frozen=True)
class OpOverride:
    """A faster implementation of a named op. ``fn`` has the exact signature of the reference in
    :mod:`llmctl.ops.reference` (see ``OP_NAMES``)."""

    name: str
    fn: Callable[..., Any]
    platform: str
    priority: int = 0


class QuantMethod(abc.ABC):
    """A weight quantization scheme: it turns checkpoint tensors into what ``apply`` consumes."""

    name: str = ""
    platforms: Sequence[str] = ()

    @abc.abstractmethod
    def supports(self, platform: str, dtype: torch.dtype) -> Support: ...

    @abc.abstractmethod
    def process_weights(self, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Called once at load time with one linear layer's checkpoint tensors ("weight", "scales", ...)."""

    @abc.abstractmethod
    def apply(self, x: torch.Tensor, weights: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        """The linear layer: ``x @ dequant(weights).T + bias``."""


class Communicator(abc.ABC):
    """Collective operations for tensor/pipeline parallelism on one platform."""

    name: str = ""
    platform: str = ""

    @abc.abstractmethod
    def init(self, rank: int, world_size: int, init_method: str) -> None: ...

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks; in place when the backend can, and the result is returned either way."""

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor: ...

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor: ...

    @abc.abstractmethod
    def send(self, tensor: torch.Tensor, dst: int) -> None: ...

    @abc.abstractmethod
    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor: ...

    @abc.abstractmethod
    def barrier(self) -> None: ...

    def destroy(self) -> None:
        """Release the process group; safe to call twice."""


@dataclass(frozen=True)
class ModelArchitecture:
    """Maps a Hugging Face ``architectures`` name to a model class that follows :mod:`llmctl.models.base`."""

    architecture: str
    model_cls: Callable[..., Any]
    priority: int = 0


@dataclass(frozen=True)
class DoctorResult:
    ok: bool
    message: str
    hint: str = ""


@dataclass(frozen=True)
class DoctorCheck:
    """An extra line in ``llmctl doctor``: ``run()`` must not raise."""

    name: str
    run: Callable[[], DoctorResult]
