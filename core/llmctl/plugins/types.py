"""The types a plugin registers. They are the whole surface a backend author implements.

A plugin never subclasses engine classes; it fills these in and hands them to the ``register`` callbacks
that the hooks in :mod:`llmctl.plugins.hookspecs` receive. Everything here is plain data or a small abstract
class whose methods are kernel calls, so a vendor can implement it without reading the engine.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from llmctl.attention import AttentionMetadata

#: The ``platform`` of a registration that applies to every platform (the torch reference attention backend).
ANY_PLATFORM = "*"


@dataclass(frozen=True)
class DeviceInfo:
    """One device a platform found; ``capabilities`` is free-form (ISA flags, compute capability, ...) and goes
    to ``llmctl doctor --json`` as it is; ``summary`` is what a person reads in ``llmctl doctor`` (for a CPU,
    "AVX-512 + bf16 dot products, no AMX"), a short phrase, not a dump of ``capabilities``."""

    index: int
    name: str
    total_memory: int | None = None
    free_memory: int | None = None
    capabilities: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


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
    #: Settings only this platform reads: option name -> a one-line description. A user passes them as engine
    #: keywords (``LLM(model, num_threads=4)``, collected in ``EngineArgs.platform_options``); ``configure``
    #: applies them. An option that the selected platform does not declare is ignored with a warning.
    options: Mapping[str, str] = {}

    @abc.abstractmethod
    def probe(self) -> ProbeResult:
        """Detect the hardware. Must never raise: return ``ProbeResult(False, reason)`` instead."""

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        """(free bytes, total bytes) on one device; core sizes the KV cache from it."""
        raise NotImplementedError(f"platform {self.name!r} does not report memory")

    def supported_dtypes(self) -> list[torch.dtype]:
        """Dtypes this platform runs, fastest first; ``dtype="auto"`` falls back along this list."""
        return [torch.float32]

    def emulated_dtypes(self) -> list[torch.dtype]:
        """Dtypes this platform runs correctly but without native instructions, so slower than its supported ones
        (bfloat16 on a CPU without bf16 dot products). Core accepts one when the user names it, with a warning, and
        never picks one for ``dtype="auto"``. Must not overlap ``supported_dtypes``."""
        return []

    def configure(self, config: Any) -> dict[str, Any]:
        """Return the engine-config changes this platform wants (field -> value). Core applies them to fields the
        user left unset and logs them; the platform does not mutate ``config`` itself, so every change is visible
        in one place. Core calls it once, right after selecting the platform and before loading the model.

        This is also where the platform applies its own ``options`` (``config.platform_options``) and process-wide
        settings only it knows about (the CPU sets torch's thread count here). Raise ``ValueError`` naming the
        option for a bad value."""
        return {}

    def torch_device(self, device_index: int = 0) -> torch.device:
        return torch.device(self.device_type if self.device_type == "cpu" else f"{self.device_type}:{device_index}")

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
        """Bytes the KV cache may take, measured rather than guessed, or ``None`` to let core size it from
        ``memory_info`` (the default, right for hosts whose memory is shared with everything else).

        Core calls this once at start-up, after the weights are loaded and only when the user set no
        ``kv_cache_memory``. ``run_forward()`` runs the real model and attention backend once on the largest
        batch the scheduler can form (``max_num_batched_tokens`` tokens in sequences of at most
        ``max_model_len``, logits for up to ``max_num_seqs`` rows) against a throwaway one-block KV cache that
        it frees before returning, so a platform can read its peak activation memory off its allocator.
        ``gpu_memory_utilization`` is the user's share of the device the engine may fill (``None``: the
        platform's own default). The other arguments only let the platform report blocks and concurrency."""
        return None

    def prepare_kv_cache(self, kv_caches: list[torch.Tensor], num_blocks: int) -> Callable[[int], None] | None:
        """Called once after core allocates the KV cache (one ``torch.empty`` per layer, in the attention backend's
        ``kv_cache_shape``) and before any step. The default does nothing and returns ``None``. Host-memory
        platforms may fault in the blocks the pool hands out first (it hands out fresh ids 0, 1, 2, ... in
        order): a first touch of fresh memory costs a page fault per 4 KiB page, and otherwise the steps pay for
        it. A platform may return a callable; core then calls it with ``n`` each time the highest block id handed
        out grows to ``n - 1`` (on the engine thread, inside ``schedule``: return quickly), so the faulted-in
        part can follow what the workload reaches instead of a fixed share. Must not change the cache's shape,
        dtype or addresses."""

    def decode_step_runner(self, spec: DecodeGraphSpec) -> DecodeStepRunner | None:
        """A runner that replays the all-decode step from captured graphs, or ``None`` to run it eagerly (the
        default). Launch overhead dominates small decode batches on GPUs; a platform without that cost (or
        without a graph API) keeps the default.

        Core asks only when the user did not set ``enforce_eager`` and the selected attention backend declares
        ``supports_graph_capture``, and calls ``capture()`` on the result once, after the KV cache exists.
        ``spec`` describes what to capture; see :class:`DecodeGraphSpec`."""
        return None


# Attention features a model declares (``llmctl.models.registry``). A backend runs a model only when its
# ``supports`` accepts every feature the model declares, so a backend that never heard of one refuses it and core
# falls back to the next backend (the torch reference implements them all). The per-layer values reach
# ``forward`` as keyword arguments, passed only by layers that use the feature.
FEATURE_SLIDING_WINDOW = "sliding_window"  # the positional ``sliding_window`` argument
FEATURE_LOGITS_SOFT_CAP = "logits_soft_cap"  # ``logits_soft_cap=cap``: scores become cap * tanh(scores / cap)
FEATURE_ALIBI = "alibi"  # ``alibi_slopes=[num_heads] float32``: scores += slope * (key_pos - query_pos)
MODEL_ATTENTION_FEATURES = frozenset({FEATURE_SLIDING_WINDOW, FEATURE_LOGITS_SOFT_CAP, FEATURE_ALIBI})


class AttentionBackend(abc.ABC):
    """Paged attention for one platform.

    The KV cache of one layer is a single tensor whose shape the backend chooses (``kv_cache_shape``).
    Core only ever touches it through ``write_kv`` and ``forward``, so the layout is the backend's business.
    """

    name: str = ""
    platform: str = ""
    priority: int = 0
    #: True when ``write_kv`` + ``forward`` on an all-decode batch can be recorded once in a device graph and
    #: replayed for other batches of the same size. A replay repeats only device work, so the step must not
    #: synchronise with the host (``.item()``, ``.tolist()``, boolean-mask indexing) nor read
    #: ``seq_lens_cpu`` (``None`` in a captured step), and may size launches only from ``num_seqs``,
    #: ``num_tokens``, ``max_query_len`` and ``max_seq_len``, which a capture holds at their worst case
    #: (``max_seq_len`` = ``max_model_len``); real lengths come from the ``seq_lens`` tensor. Padded rows are
    #: sequences with ``seq_len`` 0 and slot ``-1``: skip their KV write and give them a zero output. Core only
    #: asks the platform for a :class:`DecodeStepRunner` when this is True.
    supports_graph_capture: bool = False

    @abc.abstractmethod
    def supports(self, dtype: torch.dtype, head_size: int, block_size: int, features: frozenset[str]) -> Support:
        """Whether this backend handles the combination. ``features`` may hold "sliding_window",
        "prefix_caching", "chunked_prefill", "alibi", ... Return ``Support(False, reason)`` otherwise."""

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """Shape of one layer's KV tensor. The default is ``[2, num_blocks, block_size, num_kv_heads, head_size]``
        (keys at index 0, values at 1), the layout of the torch reference. For an 8-bit cache (a backend that
        accepted a ``kv_cache_*`` feature, ``llmctl.kv.cache_dtype``) core passes ``head_size + 4``: each row holds
        its codes and then its float32 scale."""
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
        *,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of ``query`` ([num_tokens, num_heads, head_size]) over each sequence's cached
        context. The batch is core's flattened mix of prefill chunks and decodes described by ``metadata``; the
        new tokens' K/V have already been written with ``write_kv``. Returns [num_tokens, num_heads, head_size]
        (into ``out`` when given). Must give the same result for a sequence whatever else is in the batch.

        Core also passes ``key`` and ``value``: this step's new keys/values ([num_tokens, num_kv_heads,
        head_size], the tensors just given to ``write_kv``, possibly wider in dtype than the cache), so a backend
        can attend over a prefill chunk without reading it back from the cache. A backend that reads everything
        from the cache ignores them; the result must be the same either way. They are ``None`` only when a
        caller other than core's attention layer (a test, a benchmark) leaves them out.

        Feature keywords, passed only to a backend whose ``supports`` accepted the feature (so a backend that
        never accepts one need not declare its keyword): ``logits_soft_cap`` (float) for "logits_soft_cap",
        ``alibi_slopes`` ([num_heads] float32) for "alibi" (see ``MODEL_ATTENTION_FEATURES``), and
        ``causal=False`` for "bidirectional" (encoders: every token of a sequence attends to all of it)."""


@dataclass(frozen=True)
class DecodeGraphSpec:
    """What core hands ``Platform.decode_step_runner``: a decode step written against static buffers.

    ``forward(**views)`` runs the model on the first ``batch`` rows of every buffer (``batch + extra_rows[name]``
    for buffers such as ``query_start_loc``) and returns the final hidden states ``[batch, hidden]``. It reads
    nothing per step from the host: the batch size comes from the views' shapes, every other host value is a
    worst case, so a graph captured from it is valid for any live batch of at most ``batch`` decodes.

    Before each replay the runner copies the live inputs into the leading rows of ``static_inputs`` (a live
    ``block_tables`` may be narrower than the buffer: only its leading columns are overwritten, and kernels
    read no column past a sequence's own blocks) and calls ``pad_fn(views, n, batch)`` to turn rows ``n..batch``
    into empty sequences that never write the KV cache. Capture uses ``pad_fn(views, 0, batch)``.
    """

    forward: Callable[..., torch.Tensor]
    static_inputs: Mapping[str, torch.Tensor]
    batch_sizes: tuple[int, ...]  # ascending; core pads a live batch up to the next one
    extra_rows: Mapping[str, int]
    pad_fn: Callable[[Mapping[str, torch.Tensor], int, int], None]


@runtime_checkable
class DecodeStepRunner(Protocol):
    """What ``Platform.decode_step_runner`` returns (``llmctl_gpu.graph_runner.CudaGraphRunner`` is one)."""

    def capture(self) -> None:
        """Record every batch size of the spec; core calls it once at start-up under ``inference_mode``."""

    def padded_size(self, n: int) -> int | None:
        """The captured size a live batch of ``n`` decodes replays at, or ``None``: core runs it eagerly."""

    def run(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Copy the live inputs in, pad, replay; the first ``n`` rows of the hidden states. Core only calls it
        when ``padded_size(n)`` is not ``None``, and uses the result before the next call (it may be a view of a
        buffer the next replay overwrites)."""


@dataclass(frozen=True)
class OpOverride:
    """A faster implementation of a named op. ``fn`` has the exact signature of the reference in
    :mod:`llmctl.ops.reference` (see ``OP_NAMES``)."""

    name: str
    fn: Callable[..., Any]
    platform: str
    priority: int = 0


QUANT_FORMATS: tuple[str, ...] = ("int4", "int8", "fp8", "gguf")


@dataclass(frozen=True)
class QuantLinearSpec:
    """What one quantized linear layer holds, in one of core's weight formats (``QUANT_FORMATS``). Every
    checkpoint format (GGUF blocks, GPTQ, AWQ, compressed-tensors, quantize-at-load) is unpacked at load into one
    of these layouts, so a platform writes one kernel per format, not one per checkpoint flavour.

    Tensors ``apply`` receives, by format (``N`` = out_features, ``K`` = in_features, ``G = K // group_size``):

    - ``int4``: ``qweight`` uint8 ``[N, K // 2]`` (element ``2j`` in the low nibble of byte ``j``, ``2j+1`` in the
      high one, values 0..15), ``scales`` float32 ``[N, G]``, ``mins`` float32 ``[N, G]``: weight =
      ``scales * q + mins``. Optional ``perm`` int64 ``[K]`` (GPTQ act-order): the layer computes
      ``x[:, perm] @ W.T``, so groups are contiguous along ``K``. ``K`` is ``perm``'s length, which may exceed
      the input's width and repeat columns (a tensor-parallel rank's act-order groups, padded with zero weights).
    - ``int8``: ``qweight`` int8 ``[N, K]``, ``scales`` float32 ``[N, G]``, optional ``mins`` float32 ``[N, G]``;
      with ``act == "int8"`` (W8A8) the activations are quantized per token, symmetric, and ``G == 1``.
    - ``fp8``: ``qweight`` float8_e4m3fn ``[N, K]``, ``scales`` float32 ``[N, 1]`` (per channel) or ``[1, 1]``
      (per tensor); ``act == "fp8"`` quantizes activations per token (dynamic) or, with an ``input_scale``
      float32 ``[1]`` tensor, per tensor (static).
    - ``gguf``: ``qweight`` uint8 ``[N, row_bytes]``, llama.cpp's blocks as stored, of type ``ggml_type``.
    """

    format: str
    in_features: int
    out_features: int
    bits: int
    group_size: int  # along K; equal to in_features for per-channel scales
    act: str | None = None  # None (weight-only), "int8" or "fp8"
    ggml_type: str | None = None  # the gguf format's block type name ("Q4_K", ...)
    layer: str = ""  # the layer's name, for messages

    def describe(self) -> str:
        what = self.ggml_type or f"{self.format} w{self.bits}" + (f"a{self.bits}" if self.act else "a16")
        group = "" if self.group_size >= self.in_features or self.format == "gguf" else f" g{self.group_size}"
        return what + group


class QuantMethod(abc.ABC):
    """A platform's kernel for one quantized weight format: the matmul of a linear layer whose weights are in
    that format (``QuantLinearSpec``). Core's torch reference registers one per format for every platform
    (``"*"``, priority -100); a plugin registers faster ones for its platforms and declines, through
    ``supports``, the layers it cannot run (those fall back to the reference with a warning at load).
    """

    name: str = ""  # the weight format it runs: one of QUANT_FORMATS
    platforms: Sequence[str] = ()  # platform names, or "*" for any
    priority: int = 0
    kernel: str = ""  # what the start-up log and ``llmctl doctor`` call it

    @abc.abstractmethod
    def supports(self, spec: QuantLinearSpec, dtype: torch.dtype) -> Support:
        """Whether this kernel runs this layer with activations of ``dtype``; say why not when it does not."""

    def process_weights(self, weights: dict[str, torch.Tensor], spec: QuantLinearSpec) -> dict[str, torch.Tensor]:
        """Called once at load with the layer's tensors in the format's layout; returns what ``apply`` gets
        (repacked for the kernel). The default keeps them as they are."""
        return weights

    @abc.abstractmethod
    def apply(self, x: torch.Tensor, weights: dict[str, torch.Tensor], bias: torch.Tensor | None,
              spec: QuantLinearSpec) -> torch.Tensor:
        """The linear layer: ``x @ dequant(weights).T + bias`` for ``x`` of shape ``[M, K]``, in ``x``'s dtype."""

    def fuses_silu_and_mul(self, weights: dict[str, torch.Tensor], spec: QuantLinearSpec) -> bool:
        """Whether ``apply_silu_and_mul`` runs this gate/up projection (its processed ``weights``); the default no
        leaves the gated MLP to ``apply`` then the platform's ``silu_and_mul`` op."""
        return False

    def apply_silu_and_mul(self, x: torch.Tensor, weights: dict[str, torch.Tensor], bias: torch.Tensor | None,
                           spec: QuantLinearSpec) -> torch.Tensor:
        """``silu(g) * u`` of ``apply``'s output ``[g | u]`` (the gate rows first, then as many up rows), shape
        ``[..., out_features / 2]``, within the dtype's rounding of the two ops. Why a kernel may want it: to fuse
        the activation into its GEMM, or to run it in its own library (a CPU decode step made only of the plugin's
        kernels is replayed from C). Called only where ``fuses_silu_and_mul`` said yes."""
        raise NotImplementedError(f"quantization kernel {self.name!r} does not fuse silu_and_mul")


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

    def isend(self, tensor: torch.Tensor, dst: int) -> Any:
        """Start sending ``tensor`` and return at once a handle whose ``wait()`` returns when the send is done;
        ``tensor`` must stay unchanged until then. Optional: pipeline parallelism keeps several micro-batches in
        flight only with it (a stage sends one batch on and computes the next while the later stages work);
        without it, one batch at a time."""
        raise NotImplementedError(f"communicator {self.name!r} has no non-blocking send")

    @abc.abstractmethod
    def barrier(self) -> None: ...

    def new_group(self, ranks: list[int]) -> Communicator:
        """A communicator over some of this one's ranks (``ranks``, in this group's numbering), already
        initialised: tensor parallelism inside pipeline stages needs one group per stage and one per column of
        stages. Every rank calls it for every group, in the same order, including groups it is not in (it then
        gets a communicator it must not use). The sub-group's ``send``, ``recv`` and ``broadcast`` number
        ranks within it, in increasing order of their rank here. Optional: without it a platform runs tensor or
        pipeline parallelism, not both."""
        raise NotImplementedError(f"communicator {self.name!r} cannot form sub-groups")

    def all_to_all(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Each rank sends rank ``j`` the next ``send_counts[j]`` rows of ``tensor`` (rows along dim 0, in rank
        order) and returns the rows it receives, ``recv_counts[i]`` from rank ``i``, concatenated in rank order:
        a new tensor of ``sum(recv_counts)`` rows with ``tensor``'s other dimensions and dtype. Counts may
        differ between ranks and may be zero; ``send_counts[j]`` on rank ``i`` equals ``recv_counts[i]`` on rank
        ``j``. Expert parallelism dispatches tokens to the ranks that hold their experts and combines the
        results with it. Optional: without it the experts' partial outputs are summed with ``all_reduce``."""
        raise NotImplementedError(f"communicator {self.name!r} has no all_to_all")

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
