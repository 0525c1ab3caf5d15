"""The ``cpu`` platform: hardware facts from /proc (psutil is not a dependency) and thread policy.

Everything here is read on demand and cached per process; ``probe`` never raises because core calls it while
choosing a platform and a CPU must always remain the fallback that works.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from llmctl.plugins.types import DecodeGraphSpec, DecodeStepRunner, DeviceInfo, Platform, ProbeResult

from llmctl_cpu.kv_prefault import KVPrefaulter, blocks_for_bytes

logger = logging.getLogger(__name__)

THREADS_ENV = "LLMCTL_CPU_THREADS"
# A CPU step's time grows linearly with its tokens, so a smaller prefill budget lets decodes and the next prompts
# through sooner: with 16 streams, 1024 tokens gave more output tokens/s and half the TTFT of 8192 (all of a
# 16-prompt wave in one step), offline throughput equal or better (docs/performance.md). GEMMs are already at full
# speed at 1024 rows.
CPU_MAX_NUM_BATCHED_TOKENS = 1024
# Online engines (an AsyncLLM, llmctl serve) take one request's prompt per step. Why: a CPU step costs about
# its token count, so prompts that arrive together and share a step all wait for the whole step; worse, their
# streams then decode in lockstep, finish together, and their successors arrive together again, so every prompt
# queues behind a wave. One prompt per step staggers the streams within the first wave, after which a new prompt
# waits for about one step (TTFT falls several-fold at 16 streams) while TPOT rises by the share of steps that
# carry a prompt. Offline runs keep whole waves: stepping prompts one by one costs them throughput
# (docs/performance.md, "Served latency under load").
CPU_ONLINE_MAX_NUM_PARTIAL_PREFILLS = 1
# Online engines also give the decodes a step of their own after each step with a prompt: a served stream's next
# request reaches the engine just after the step following its predecessor's end has started, and with streams one
# step apart that step is the previous stream's prompt, so every prompt waited for another prompt's step before
# its own. One decode step between them (short: the replayed decode graph) makes the wait that step instead
# (TTFT p50 at 16 streams 0.61x under load, TPOT and throughput within a few per cent; docs/performance.md). It is
# opt-in (--min-decode-steps-between-prefills 1) until its cost with many concurrent and stalled streams is
# understood: the suite's served tests with many streams (stalled readers above all) ran up to 3x longer with it.
CPU_ONLINE_MIN_DECODE_STEPS_BETWEEN_PREFILLS = 0
ONLINE_USAGE_CONTEXTS = ("engine_context", "openai_api_server")

# Flags worth showing in doctor/probe output; the full /proc list is hundreds of entries.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")


@dataclass(frozen=True)
class CpuInfo:
    model_name: str
    logical_cores: int
    physical_cores: int
    usable_physical_cores: int  # physical cores with at least one logical CPU in this process's affinity mask
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def has_bf16_isa(self) -> bool:
        """Native bf16 dot products; without them oneDNN emulates bf16 and it is slower than fp32."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags


def isa_summary(flags: frozenset[str] | set[str]) -> str:
    """The vector ISA in a person's words, e.g. "AVX-512 + bf16 dot products, no AMX": what decides which kernels
    run, so test failures and doctor name it."""
    if "avx512f" in flags:
        parts = ["AVX-512"]
        if "avx512_vnni" in flags:
            parts.append("VNNI")
        if "avx512_bf16" in flags:
            parts.append("bf16 dot products")
        base = " + ".join(parts)
        return f"{base}, AMX" if "amx_tile" in flags else f"{base}, no AMX"
    if "avx2" in flags:
        return "AVX2 + FMA, no AVX-512" if "fma" in flags else "AVX2, no FMA, no AVX-512"
    return "no AVX2 (generic x86-64 or another architecture)"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def parse_cpuinfo(text: str, allowed: set[int] | None = None) -> CpuInfo:
    """Parse /proc/cpuinfo. Physical cores are distinct (physical id, core id) pairs; a kernel that omits those
    fields (some VMs, non-x86) gets one core per logical CPU."""
    model, flags = "unknown CPU", frozenset[str]()
    cores: dict[int, tuple[str, str]] = {}
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "processor" not in fields:
            continue
        try:
            cpu = int(fields["processor"])
        except ValueError:
            continue
        model = fields.get("model name", model)
        if not flags and "flags" in fields:
            flags = frozenset(fields["flags"].split())
        cores[cpu] = (fields.get("physical id", "?"), fields.get("core id", str(cpu)))
    logical = len(cores) or (os.cpu_count() or 1)
    physical = len(set(cores.values())) or logical
    allowed = allowed if allowed is not None else set(cores)
    usable = len({cores[c] for c in allowed if c in cores}) or max(1, len(allowed))
    return CpuInfo(model, logical, physical, usable, flags)


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    text = _read("/proc/cpuinfo")
    if text is None:
        n = os.cpu_count() or 1
        return CpuInfo("unknown CPU", n, n, len(_affinity()), frozenset())
    return parse_cpuinfo(text, _affinity())


def memory_bytes() -> tuple[int, int]:
    """(available, total). /proc/meminfo's MemAvailable counts reclaimable page cache, unlike sysconf's free
    pages, so KV sizing does not starve just because files were read. A cgroup v2 limit (containers) caps both."""
    avail = total = None
    text = _read("/proc/meminfo")
    if text:
        vals = {}
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                vals[key] = int(parts[0]) * 1024
        total, avail = vals.get("MemTotal"), vals.get("MemAvailable", vals.get("MemFree"))
    if total is None or avail is None:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        avail = os.sysconf("SC_AVPHYS_PAGES") * page
    limit = (_read("/sys/fs/cgroup/memory.max") or "").strip()
    if limit.isdigit():
        used = (_read("/sys/fs/cgroup/memory.current") or "0").strip()
        total = min(total, int(limit))
        avail = max(0, min(avail, int(limit) - (int(used) if used.isdigit() else 0)))
    return avail, total


def mkldnn_bf16_usable() -> bool:
    """Whether torch's oneDNN will run bf16 GEMMs natively (its own check of the ISA, not just our flags)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check()) if check is not None else cpu_info().has_bf16_isa
    except Exception:
        return False


def c_bf16_kernels() -> bool:
    """Whether the C kernels run a bf16 model's hot ops (the GEMM and the RMSNorm), not torch's emulated bf16."""
    from llmctl_cpu import native

    lib = native.kernels()
    return lib is not None and lib.has_gemm_bf16 and lib.has_norm


def default_num_threads() -> int:
    return max(1, cpu_info().usable_physical_cores)


def configure_threads(requested: Any = None) -> int:
    """Set torch's intra-op threads for the engine and return the count.

    One thread per *physical* core in this process's affinity mask: SMT siblings share the vector/AMX units, so
    a second thread per core adds no GEMM throughput but makes every OpenMP barrier wait for the slowest
    sibling; and the affinity mask (taskset, cgroup cpusets in containers) is what we may actually use, whereas
    ``os.cpu_count()`` reports the whole host. ``requested`` (the engine's ``num_threads`` option; ``None`` or 0:
    unset) overrides the choice unless ``OMP_NUM_THREADS`` is set; without it ``LLMCTL_CPU_THREADS`` does. An
    explicit ``OMP_NUM_THREADS`` is otherwise left alone because torch already honoured it and the user meant it.
    """
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 0):
        raise ValueError(f"num_threads: must be a positive integer, got {requested!r}")
    if requested:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        torch.set_num_threads(requested)
        return requested
    explicit = os.environ.get(THREADS_ENV)
    if explicit:
        try:
            n = max(1, int(explicit))
        except ValueError:
            logger.warning("%s=%r is not an integer; ignoring it", THREADS_ENV, explicit)
        else:
            torch.set_num_threads(n)
            return n
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = default_num_threads()
    torch.set_num_threads(n)
    return n


KV_PREFAULT_ENV = "LLMCTL_CPU_KV_PREFAULT_MB"
# The start-up slab, and how far ahead of the blocks reached the pages are kept faulted in: one slab covers
# well over a full 1024-token step's new blocks for the small models (SmolLM2-135M: ~180 blocks of 16 tokens,
# bf16), so the worker refills it long before a step can outrun it.
DEFAULT_KV_PREFAULT_MB = 64


def kv_prefault_bytes() -> int:
    raw = os.environ.get(KV_PREFAULT_ENV, "").strip()
    if not raw:
        return DEFAULT_KV_PREFAULT_MB << 20
    try:
        mb = int(raw)
    except ValueError:
        logger.warning("%s=%r is not a whole number of MiB; using %d", KV_PREFAULT_ENV, raw, DEFAULT_KV_PREFAULT_MB)
        return DEFAULT_KV_PREFAULT_MB << 20
    return max(mb, 0) << 20


def prefault_kv_cache(kv_caches: list[torch.Tensor], num_blocks: int, budget_bytes: int) -> int:
    """Zero blocks ``[0, n)`` of every layer's cache, with ``n`` as many as ``budget_bytes`` covers over all layers.
    Dimension 1 is the block index in the CPU backend's ``[2, num_blocks, ...]`` layout; a cache in another
    layout gets the same share of its leading bytes. Returns ``n``."""
    if not kv_caches or num_blocks <= 0 or budget_bytes <= 0:
        return 0
    n = blocks_for_bytes(kv_caches, num_blocks, budget_bytes)
    if n <= 0:
        return 0
    with torch.no_grad():
        for t in kv_caches:
            if t.dim() >= 2 and t.shape[1] == num_blocks:
                t[:, :n].zero_()
            else:
                flat = t.view(-1)
                flat[: flat.numel() * n // num_blocks].zero_()
    return n


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    priority = 0
    options = {"num_threads": "torch intra-op threads for the engine (default: one per usable physical core; "
                              "an explicit OMP_NUM_THREADS wins)"}

    def probe(self) -> ProbeResult:
        try:
            info = cpu_info()
            avail, total = memory_bytes()
            caps: dict[str, Any] = {
                "physical_cores": info.physical_cores,
                "logical_cores": info.logical_cores,
                "usable_physical_cores": info.usable_physical_cores,
                "isa": {flag: flag in info.flags for flag in ISA_FLAGS},
                "mkldnn_available": torch.backends.mkldnn.is_available(),
                "mkldnn_bf16": mkldnn_bf16_usable(),
                "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "torch_threads": torch.get_num_threads(),
            }
            cores = (f"{info.physical_cores} physical cores" + (f" ({info.usable_physical_cores} usable)"
                     if info.usable_physical_cores != info.physical_cores else "")
                     + (f", {info.logical_cores} threads" if info.logical_cores != info.physical_cores else ""))
            device = DeviceInfo(0, info.model_name, total_memory=total, free_memory=avail, capabilities=caps,
                                summary=f"{cores}; {isa_summary(info.flags)}")
            return ProbeResult(True, devices=(device,), details={"supported_dtypes": [str(d) for d in
                                                                                     self.supported_dtypes()]})
        except Exception as exc:  # a CPU is always there; report what failed but stay usable
            return ProbeResult(True, reason=f"CPU details unavailable: {type(exc).__name__}: {exc}")

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        return memory_bytes()

    def supported_dtypes(self) -> list[torch.dtype]:
        """bf16 first where it is the faster dtype: with bf16 dot products (oneDNN and the C kernels), or where the
        C kernels run every hot bf16 op on AVX2 + FMA (GEMMs, RMSNorm, attention, the decode replay), which reads
        half the bytes of float32 per weight: as fast in batches, about twice as fast per decode step."""
        if (cpu_info().has_bf16_isa and mkldnn_bf16_usable()) or c_bf16_kernels():
            return [torch.bfloat16, torch.float32]
        return [torch.float32]

    def emulated_dtypes(self) -> list[torch.dtype]:
        # Without bf16 dot products or the C kernels torch converts to float32 around each op: correct, slower than
        # float32, and still what a user who names bfloat16 (a bf16 checkpoint's own numerics) asked for.
        return [] if torch.bfloat16 in self.supported_dtypes() else [torch.bfloat16]

    def configure(self, config: Any) -> dict[str, Any]:
        """Set the engine's thread count (``configure_threads``: the ``num_threads`` option, else
        ``LLMCTL_CPU_THREADS``, else one per usable physical core; left alone under an explicit ``OMP_NUM_THREADS``)
        and suggest a step token budget when the user left it unset (core
        never overrides an explicit value)."""
        n = configure_threads((getattr(config, "platform_options", None) or {}).get("num_threads"))
        logger.info("platform cpu: %d torch threads", n)
        changes: dict[str, Any] = {}
        if hasattr(config, "max_num_batched_tokens") and config.max_num_batched_tokens is None:
            changes["max_num_batched_tokens"] = max(CPU_MAX_NUM_BATCHED_TOKENS, getattr(config, "block_size", 0) or 0)
        if getattr(config, "max_num_partial_prefills", 0) is None and \
                getattr(config, "usage_context", None) in ONLINE_USAGE_CONTEXTS:
            changes["max_num_partial_prefills"] = CPU_ONLINE_MAX_NUM_PARTIAL_PREFILLS
        if getattr(config, "min_decode_steps_between_prefills", 0) is None and \
                getattr(config, "usage_context", None) in ONLINE_USAGE_CONTEXTS:
            changes["min_decode_steps_between_prefills"] = CPU_ONLINE_MIN_DECODE_STEPS_BETWEEN_PREFILLS
        return changes

    def prepare_kv_cache(self, kv_caches: list[torch.Tensor], num_blocks: int) -> KVPrefaulter | None:
        """Fault in the first ``LLMCTL_CPU_KV_PREFAULT_MB`` (default 64) MiB of blocks now, and return the
        ``KVPrefaulter`` that keeps as much faulted in ahead of the blocks the pool reaches (0: neither; pages
        fault on first touch). Why: every first touch of a fresh 4 KiB page is a page fault, several microseconds
        on a VM, which the steps entering new blocks would pay; a fixed share faulted in at start-up instead
        (1 GiB before) made the process hold it whatever the workload used (figures in docs/performance.md)."""
        nbytes = kv_prefault_bytes()
        if not kv_caches or num_blocks <= 0 or nbytes <= 0:
            return None
        n = blocks_for_bytes(kv_caches, num_blocks, nbytes)
        return KVPrefaulter(kv_caches, num_blocks, initial_blocks=n, ahead_blocks=max(n, 1))

    def decode_step_runner(self, spec: DecodeGraphSpec) -> DecodeStepRunner | None:
        """All-decode steps recorded once and replayed from C (``llmctl_cpu.graph``), when the C kernels are built;
        a step the recorder refuses (a torch fallback inside it) runs eagerly."""
        from llmctl_cpu import graph

        return graph.make_runner(spec)
