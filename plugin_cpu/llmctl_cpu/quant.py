"""The CPU plugin's quantized-linear kernels (``native/quant.c``), registered per weight format through the
quantization hook: int8 W8A8 on AVX512-VNNI (or ``vpmaddubsw`` on AVX2), and weight-only int4 / int8 GEMMs that
stream the packed weights (AVX-512: core's layout as stored; AVX2 + FMA: repacked into 16-column panels at load).
Layers these kernels decline (group sizes that are not a multiple of 32, fp8, GGUF block types other than
Q2_K/Q3_K, which ``quant_kblocks`` unpacks) run on core's torch reference, and the start-up log says so.

quant.c is compiled like kernels.c (same compiler, flags and cache) into its own library, so the two build
independently; ``LLMCTL_CPU_NATIVE=0`` turns both off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from llmctl.plugins.types import QuantLinearSpec, QuantMethod, Support

from llmctl_cpu import native

logger = logging.getLogger(__name__)

QUANT_SOURCE = Path(native.__file__).with_name("quant.c")
_p, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# 1: GGUF layers run on int8 activations as llama.cpp does (faster, and off by default: on the default model's
# near-tied first tokens it flips answers that float activations and the dequantized weights agree on).
INT8_ACT_ENV = "LLMCTL_CPU_GGUF_INT8_ACT"


def int8_act_enabled() -> bool:
    return os.environ.get(INT8_ACT_ENV, "0").strip().lower() in ("1", "true", "yes", "on")
ACT8_HALF_SCALES = 256  # quant.c: the int8-activation GEMM's bits flag for fp16 scales and mins


def _fp16_exact(t: torch.Tensor) -> bool:
    h = t.half()
    return bool(torch.isfinite(h).all()) and torch.equal(h.float(), t)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _bind(fn: Any, restype: Any, argtypes: list[Any]) -> Any:
    """A ctypes function of the library with its result and argument types set."""
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


class _Direct:
    """Without the kernels library (no decode replay then), the panel GEMM is called directly."""

    _quant_wq = staticmethod(native._call_at_address)


class QuantKernels:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.has_vnni = bool(lib.llmctl_quant_has_vnni())
        self.has_avx512 = bool(lib.llmctl_quant_has_avx512())
        # AVX2 + FMA (AVX-512 hosts too): weight-only GEMMs on 16-column panels; without VNNI, W8A8 on vpmaddubsw
        self.has_avx2 = bool(lib.llmctl_quant_has_avx2())
        self._pack = _bind(lib.llmctl_pack_int8_panels, None, [_p, _i64, _i64, _p, _p])
        self._w8a8 = _bind(lib.llmctl_gemm_w8a8, _int, [_p, _i64, _i64, _p, _p, _p, _p, _i64, _p])
        self._wq = _bind(lib.llmctl_gemm_wq, _int, [_p, _i64, _i64, _p, _int, _p, _p, _i64, _p, _i64, _p])
        self._pack_wq = _bind(lib.llmctl_pack_wq_panels, None, [_p, _int, _i64, _i64, _p, _p, _i64, _p, _p, _p])
        self._wq_panels = _bind(lib.llmctl_gemm_wq_panels, _int, self._wq.argtypes)
        self._wq_panels_at = native.call_target(self._wq_panels)
        self._wq_panels_bf16 = _bind(lib.llmctl_gemm_wq_panels_bf16, _int, self._wq.argtypes)
        self._wq_panels_bf16_at = native.call_target(self._wq_panels_bf16)
        # GGUF layers: int8 activations in blocks of 32 and integer dot products (same argument list, so the same
        # recorded QUANT_GEMM_WQ call replays it)
        self._pack_act8 = _bind(lib.llmctl_pack_wq_act8, None, self._pack_wq.argtypes)
        self._act8 = _bind(lib.llmctl_gemm_wq_act8, _int, self._wq.argtypes)
        self._act8_at = native.call_target(self._act8)
        self._act8_bf16 = _bind(lib.llmctl_gemm_wq_act8_bf16, _int, self._wq.argtypes)
        self._act8_bf16_at = native.call_target(self._act8_bf16)
        self.has_f16c = bool(lib.llmctl_quant_has_f16c())
        self._quant_row = _bind(lib.llmctl_quant_row_q8_32, _int, [_p, _i64, _i64, _p, _p, _p])
        self._use_amx = _bind(lib.llmctl_quant_use_amx, _int, [_int])
        self.amx = False
        self.use_amx(native.env_on(native.AMX_ENV))

    def use_amx(self, on: bool) -> bool:
        """AMX tiles for W8A8 GEMMs of 16 rows and more (prefill), where the CPU has AMX-INT8 and Linux grants
        the tile state; the sums are exact integers, so the result does not change with the path."""
        self.amx = bool(self._use_amx(int(on)))
        return self.amx

    def pack_int8(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = w.shape
        w = w.contiguous()
        panels = torch.empty((n + 15) // 16 * ((k + 3) // 4) * 64, dtype=torch.int8)
        colsum = torch.empty((n + 15) // 16 * 16, dtype=torch.int32)
        self._pack(w.data_ptr(), n, k, panels.data_ptr(), colsum.data_ptr())
        return panels, colsum

    def gemm_w8a8(self, x: torch.Tensor, panels: torch.Tensor, colsum: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None, n: int) -> torch.Tensor:
        m, k = x.shape
        y = torch.empty(m, n, dtype=torch.float32)
        if m:
            rc = self._w8a8(x.data_ptr(), m, k, panels.data_ptr(), colsum.data_ptr(), scales.data_ptr(), _ptr(bias),
                            n, y.data_ptr())
            if rc:
                raise MemoryError("llmctl_gemm_w8a8: out of memory")
        return y

    def gemm_wq(self, x: torch.Tensor, qweight: torch.Tensor, bits: int, scales: torch.Tensor,
                mins: torch.Tensor | None, group: int, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        m, k = x.shape
        y = torch.empty(m, n, dtype=torch.float32)
        if m:
            rc = self._wq(x.data_ptr(), m, k, qweight.data_ptr(), bits, scales.data_ptr(), _ptr(mins), group,
                          _ptr(bias), n, y.data_ptr())
            if rc:
                raise RuntimeError(f"llmctl_gemm_wq failed ({rc})")
        return y

    @property
    def has_w8a8(self) -> bool:
        return self.has_vnni or self.has_avx2

    def pack_wq_panels(self, qweight: torch.Tensor, bits: int, scales: torch.Tensor, mins: torch.Tensor | None,
                       group: int) -> dict[str, torch.Tensor]:
        """Core's int4 / int8 layout -> the panel layout of ``gemm_wq_panels`` (AVX2 builds)."""
        n = qweight.shape[0]
        k = qweight.shape[1] * (2 if bits == 4 else 1)
        np_, ng = (n + 15) // 16, k // group
        qweight = qweight.contiguous()
        scales = scales.to(torch.float32).contiguous()
        mins = None if mins is None else mins.to(torch.float32).contiguous()
        out = {"qpanels": torch.empty(np_ * qweight.shape[1] * 16, dtype=torch.uint8),
               "spanels": torch.empty(np_ * ng * 16, dtype=torch.float32),
               "mpanels": torch.empty(np_ * ng * 16, dtype=torch.float32)}
        self._pack_wq(qweight.data_ptr(), bits, n, k, scales.data_ptr(), _ptr(mins), group,
                      out["qpanels"].data_ptr(), out["spanels"].data_ptr(), out["mpanels"].data_ptr())
        return out

    def pack_wq_act8(self, qweight: torch.Tensor, bits: int, scales: torch.Tensor, mins: torch.Tensor | None,
                     group: int) -> dict[str, torch.Tensor]:
        """Core's int4 / int8 layout -> the panels of the int8-activation GEMM (``gemm_wq_panels`` runs them: the
        ``a8panels`` key says which kernel); k and group multiples of 32, AVX2 builds."""
        n = qweight.shape[0]
        k = qweight.shape[1] * (2 if bits == 4 else 1)
        np_, ng = (n + 15) // 16, k // group
        qweight = qweight.contiguous()
        scales = scales.to(torch.float32).contiguous()
        mins = None if mins is None else mins.to(torch.float32).contiguous()
        out = {"a8panels": torch.empty(np_ * k * (8 if bits == 4 else 16), dtype=torch.uint8),
               "spanels": torch.empty(np_ * ng * 16, dtype=torch.float32),
               "mpanels": torch.empty(np_ * ng * 16, dtype=torch.float32)}
        self._pack_act8(qweight.data_ptr(), bits, n, k, scales.data_ptr(), _ptr(mins), group,
                        out["a8panels"].data_ptr(), out["spanels"].data_ptr(), out["mpanels"].data_ptr())
        if mins is None:  # nothing to read for them (Q8_0)
            out["mpanels"] = torch.empty(0, dtype=out["spanels"].dtype)
        if self.has_f16c and all(_fp16_exact(out[key]) for key in ("spanels", "mpanels")):
            # Q4_0/Q4_1/Q8_0 scales are fp16 in the file: half the scale bytes, the same values
            out["spanels"], out["mpanels"] = out["spanels"].half(), out["mpanels"].half()
        return out

    def quantize_rows_q8_32(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The int8-activation GEMM's own quantization of float32 rows ``[m, k]`` (k % 32 == 0): int8 ``[m, k]``,
        each block's scale ``[m, k / 32]`` and scale times the block's integer sum ``[m, k / 32]``."""
        m, k = x.shape
        x = x.contiguous()
        xq = torch.empty(m, k, dtype=torch.int8)
        xd = torch.empty(m, k // 32)
        xs = torch.empty(m, k // 32)
        if self._quant_row(x.data_ptr(), m, k, xq.data_ptr(), xd.data_ptr(), xs.data_ptr()):
            raise ValueError(f"quantize_rows_q8_32: {k} columns is not a multiple of 32")
        return xq, xd, xs

    def gemm_wq_panels(self, x: torch.Tensor, panels: dict[str, torch.Tensor], bits: int, group: int,
                       bias: torch.Tensor | None, n: int) -> torch.Tensor:
        """x float32, or bf16 (then y is bf16: the float32 result rounded, as ``.to(torch.bfloat16)`` would).
        ``panels`` from ``pack_wq_panels`` (float FMAs) or ``pack_wq_act8`` (int8 activations)."""
        m, k = x.shape
        bf16 = x.dtype == torch.bfloat16
        y = torch.empty(m, n, dtype=torch.bfloat16 if bf16 else torch.float32)
        if m:
            act8 = "a8panels" in panels
            mp: torch.Tensor | None = panels["mpanels"]
            if act8:
                target, qp = (self._act8_bf16_at if bf16 else self._act8_at), panels["a8panels"]
                if panels["spanels"].dtype == torch.float16:
                    bits |= ACT8_HALF_SCALES
                mp = mp if mp.numel() else None
            else:
                target, qp = (self._wq_panels_bf16_at if bf16 else self._wq_panels_at), panels["qpanels"]
            # through the kernels library when it is loaded, so that a recorded decode step replays this call
            call = (native.kernels() or _Direct)._quant_wq
            rc = call(target, x.data_ptr(), m, k, qp.data_ptr(), bits,
                      panels["spanels"].data_ptr(), _ptr(mp), group, _ptr(bias), n, y.data_ptr())
            if rc:
                raise RuntimeError(f"llmctl_gemm_wq_{'act8' if act8 else 'panels'} failed ({rc})")
        return y


def _build(cc: str) -> Path:
    source = QUANT_SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), native._compiler_version(cc).encode(),
                                     " ".join(native.CFLAGS).encode(), platform.machine().encode(),
                                     native._cpu_flags().encode()])).hexdigest()[:20]
    for directory in (native._cache_dir(), Path(tempfile.gettempdir()) / "llmctl-cpu-kernels"):
        target = directory / f"quant-{key}.so"
        if target.exists():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
        except OSError:
            continue
        try:
            proc = subprocess.run([cc, *native.CFLAGS, "-o", tmp, str(QUANT_SOURCE), "-lm"], capture_output=True,
                                  text=True, timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"{Path(cc).name} failed: {proc.stderr.strip()[-500:]}")
            os.replace(tmp, target)
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("no writable cache directory for the compiled quantization kernels")


@functools.cache
def _load() -> tuple[QuantKernels | None, str]:
    if not native.env_on(native.DISABLE_ENV):
        return None, f"disabled by {native.DISABLE_ENV}=0"
    if platform.system() != "Linux":
        return None, f"only built on Linux (this is {platform.system()})"
    cc = native._compiler()
    if cc is None:
        return None, "no C compiler found"
    try:
        return QuantKernels(ctypes.CDLL(str(_build(cc)))), "ok"
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("CPU quantization kernels unavailable, using core's reference: %s", exc)
        return None, f"build failed: {exc}"


def quant_kernels() -> QuantKernels | None:
    return _load()[0]


def _build_words(lib: QuantKernels | None) -> str:
    """The vector path the quantized GEMMs were built with, for doctor and the start-up summary."""
    if lib is None:
        return f"unavailable: {_load()[1]}"
    if lib.has_avx2:
        return "avx2+fma, 16-column panels"
    if lib.has_avx512:
        return "avx-512"
    return "portable C loops, no AVX2 or AVX-512"


def _act8_words() -> str:
    lib = quant_kernels()
    if lib is None or not lib.has_avx2 or not int8_act_enabled():
        return ""
    return "; GGUF layers: int8 activations in blocks of 32, integer dot products"


def _as_f32_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()


def int8_activations(spec: QuantLinearSpec) -> bool:
    """Whether a weight-only layer runs on int8 activations (``llmctl_gemm_wq_act8``): with
    ``LLMCTL_CPU_GGUF_INT8_ACT=1``, the layers of GGUF files (llama.cpp computes them this way too) in AVX2 builds,
    groups and k multiples of 32. Decided per layer at load, never by the batch, so rows stay batch-invariant."""
    lib = quant_kernels()
    return (lib is not None and lib.has_avx2 and spec.ggml_type is not None and spec.act is None
            and spec.group_size % 32 == 0 and spec.in_features % spec.group_size == 0
            and int8_act_enabled())


def _weight_only_process(lib: QuantKernels, weights: dict[str, torch.Tensor], bits: int,
                         group: int, spec: QuantLinearSpec | None = None) -> dict[str, torch.Tensor]:
    """Builds with AVX2 + FMA (AVX-512 hosts included) repack into 16-column panels (for integer dot products on int8
    activations where ``int8_activations`` says so); others stream core's layout as it is."""
    out = {k: v for k, v in weights.items() if k == "perm"}
    if spec is not None and int8_activations(spec):
        out.update(lib.pack_wq_act8(weights["qweight"], bits, weights["scales"], weights.get("mins"), group))
        return out
    if lib.has_avx2:
        out.update(lib.pack_wq_panels(weights["qweight"], bits, weights["scales"], weights.get("mins"), group))
        return out
    out["qweight"] = weights["qweight"].contiguous()
    out["scales"] = weights["scales"].to(torch.float32).contiguous()
    if weights.get("mins") is not None:
        out["mins"] = weights["mins"].to(torch.float32).contiguous()
    return out


def _panels_bf16(x: torch.Tensor, weights: dict[str, torch.Tensor]) -> bool:
    """bf16 activations go to the panel GEMM as they are (no torch conversions around it: a bf16 decode step with
    these layers stays recordable for the replay)."""
    return x.dtype == torch.bfloat16 and _has_panels(weights) and weights.get("perm") is None


def _has_panels(weights: dict[str, torch.Tensor]) -> bool:
    return "qpanels" in weights or "a8panels" in weights


def _weight_only_gemm(lib: QuantKernels, xf: torch.Tensor, weights: dict[str, torch.Tensor], bits: int,
                      group: int, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    if _has_panels(weights):
        return lib.gemm_wq_panels(xf, weights, bits, group, bias, n)
    return lib.gemm_wq(xf, weights["qweight"], bits, weights["scales"], weights.get("mins"), group, bias, n)


class _SiluAndMulInKernels:
    """Gate/up projections end with the kernels library's SiLU-and-mul, which a recorded decode step replays (torch's
    silu and mul would stop the recording, and every quantized layer's step would then run eagerly, with Python
    between each of its ~270 kernel calls). Mixed into the weight-only kernels, whose GEMMs are recorded too."""

    def fuses_silu_and_mul(self, weights: dict[str, torch.Tensor], spec: QuantLinearSpec) -> bool:
        lib = native.kernels()
        return spec.act is None and spec.out_features % 2 == 0 and lib is not None

    def apply_silu_and_mul(self, x: torch.Tensor, weights: dict[str, torch.Tensor], bias: torch.Tensor | None,
                           spec: QuantLinearSpec) -> torch.Tensor:
        y = self.apply(x, weights, bias, spec)  # type: ignore[attr-defined]  # the QuantMethod it is mixed into
        lib = native.kernels()
        if lib is None or y.dtype not in (torch.float32, torch.bfloat16):
            d = spec.out_features // 2
            return torch.nn.functional.silu(y[..., :d]) * y[..., d:]
        out = lib.silu_and_mul(y.reshape(-1, spec.out_features))
        return out.reshape(*x.shape[:-1], spec.out_features // 2)


def _int8_group_ok(spec: QuantLinearSpec) -> bool:
    return (spec.group_size % 32 == 0 or spec.group_size == 16) and spec.in_features % spec.group_size == 0


class CpuW8A8Kernel(_SiluAndMulInKernels, QuantMethod):
    """int8 weights (per channel) x int8 activations (per token) with exact int32 sums (AVX512-VNNI, or
    vpmaddubsw on AVX2), and int8 weight-only GEMMs."""

    name = "int8"
    platforms = ("cpu",)
    priority = 10

    @property
    def kernel(self) -> str:  # type: ignore[override]  # what runs depends on the host's build
        lib = quant_kernels()
        if lib is not None and lib.has_vnni:
            return "cpu int8 w8a8 gemm (avx512-vnni; amx-int8 tiles from 16 rows where present) + int8 weight-only gemm"
        if lib is not None and lib.has_avx2:
            return ("cpu int8 w8a8 gemm (avx2 vpmaddubsw) + int8 weight-only gemm (avx2+fma, 16-column panels)"
                    + _act8_words())
        return f"cpu int8 weight-only gemm ({_build_words(lib)}; W8A8 needs AVX512-VNNI or AVX2)"

    def supports(self, spec: QuantLinearSpec, dtype: torch.dtype) -> Support:
        lib = quant_kernels()
        if lib is None:
            return Support(False, f"CPU quantization kernels unavailable ({_load()[1]})")
        if spec.act == "int8":
            if not lib.has_w8a8:
                return Support(False, "this CPU build has neither AVX512-VNNI nor AVX2")
            if spec.group_size < spec.in_features:
                return Support(False, "W8A8 needs per-channel weight scales")
            return Support(True)
        if spec.act is None and _int8_group_ok(spec):
            return Support(True)
        return Support(False, f"int8 group size {spec.group_size} is neither 16 nor a multiple of 32")

    def process_weights(self, weights: dict[str, torch.Tensor], spec: QuantLinearSpec) -> dict[str, torch.Tensor]:
        lib = quant_kernels()
        assert lib is not None
        if spec.act == "int8":
            out = {k: v for k, v in weights.items() if k == "perm"}
            out["panels"], out["colsum"] = lib.pack_int8(weights["qweight"])
            out["scales"] = weights["scales"].reshape(-1).to(torch.float32).contiguous()
            return out
        return _weight_only_process(lib, weights, 8, spec.group_size, spec)

    def apply(self, x: torch.Tensor, weights: dict[str, torch.Tensor], bias: torch.Tensor | None,
              spec: QuantLinearSpec) -> torch.Tensor:
        lib = quant_kernels()
        assert lib is not None
        shape = x.shape
        if spec.act is None and _panels_bf16(x, weights):
            y = lib.gemm_wq_panels(x.reshape(-1, shape[-1]).contiguous(), weights, 8, spec.group_size,
                                   None if bias is None else bias.to(torch.float32).contiguous(), spec.out_features)
            return y.reshape(*shape[:-1], spec.out_features)
        xf = _as_f32_2d(x)
        perm = weights.get("perm")
        if perm is not None:
            xf = xf.index_select(1, perm)
        b = None if bias is None else bias.to(torch.float32).contiguous()
        if spec.act == "int8":
            y = lib.gemm_w8a8(xf, weights["panels"], weights["colsum"], weights["scales"], b, spec.out_features)
        else:
            y = _weight_only_gemm(lib, xf, weights, 8, spec.group_size, b, spec.out_features)
        return y.to(x.dtype).reshape(*shape[:-1], spec.out_features)


class CpuInt4Kernel(_SiluAndMulInKernels, QuantMethod):
    """4-bit weights streamed as stored (GGUF Q4_0/Q4_1, GPTQ, AWQ, compressed-tensors W4A16)."""

    name = "int4"
    platforms = ("cpu",)
    priority = 10

    @property
    def kernel(self) -> str:  # type: ignore[override]
        return f"cpu int4 dequantizing gemm ({_build_words(quant_kernels())}){_act8_words()}"

    def supports(self, spec: QuantLinearSpec, dtype: torch.dtype) -> Support:
        lib = quant_kernels()
        if lib is None:
            return Support(False, f"CPU quantization kernels unavailable ({_load()[1]})")
        if spec.group_size % 32 or spec.in_features % spec.group_size:
            return Support(False, f"int4 group size {spec.group_size} is not a multiple of 32")
        return Support(True)

    def process_weights(self, weights: dict[str, torch.Tensor], spec: QuantLinearSpec) -> dict[str, torch.Tensor]:
        lib = quant_kernels()
        if lib is not None and lib.has_avx2:
            return _weight_only_process(lib, weights, 4, spec.group_size, spec)
        return {k: v.contiguous() if v.is_floating_point() is False else v.to(torch.float32).contiguous()
                for k, v in weights.items()}

    def apply(self, x: torch.Tensor, weights: dict[str, torch.Tensor], bias: torch.Tensor | None,
              spec: QuantLinearSpec) -> torch.Tensor:
        lib = quant_kernels()
        assert lib is not None
        shape = x.shape
        b = None if bias is None else bias.to(torch.float32).contiguous()
        perm = weights.get("perm")
        if _panels_bf16(x, weights):
            y = lib.gemm_wq_panels(x.reshape(-1, shape[-1]).contiguous(), weights, 4, spec.group_size, b,
                                   spec.out_features)
            return y.reshape(*shape[:-1], spec.out_features)
        xf = _as_f32_2d(x)
        if perm is not None:
            xf = xf.index_select(1, perm)
        y = _weight_only_gemm(lib, xf, weights, 4, spec.group_size, b, spec.out_features)
        return y.to(x.dtype).reshape(*shape[:-1], spec.out_features)


def quant_overrides() -> list[QuantMethod]:
    from llmctl_cpu.quant_kblocks import CpuKBlockKernel

    return [CpuW8A8Kernel(), CpuInt4Kernel(), CpuKBlockKernel()]
