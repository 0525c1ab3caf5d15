"""``llmctl doctor`` lines for the CPU: the thread setup and whether bf16 will actually be fast here."""

from __future__ import annotations

import os

import torch
from llmctl.plugins.types import DoctorCheck, DoctorResult

from llmctl_cpu.platform import THREADS_ENV, c_bf16_kernels, cpu_info, default_num_threads, mkldnn_bf16_usable


def check_threads() -> DoctorResult:
    try:
        info = cpu_info()
        current, want = torch.get_num_threads(), default_num_threads()
        env = {k: os.environ[k] for k in (THREADS_ENV, "OMP_NUM_THREADS") if os.environ.get(k)}
        msg = (f"torch threads {current}; {info.usable_physical_cores} usable physical cores "
               f"({info.physical_cores} physical / {info.logical_cores} logical on {info.model_name})"
               + (f"; env {env}" if env else ""))
        if current > info.usable_physical_cores and not env:
            return DoctorResult(False, msg, f"more threads than physical cores slows GEMMs; set {THREADS_ENV}={want}")
        return DoctorResult(True, msg)
    except Exception as exc:
        return DoctorResult(False, f"could not read thread settings: {type(exc).__name__}: {exc}")


def check_bf16() -> DoctorResult:
    try:
        info = cpu_info()
        isa = [f for f in ("avx512_bf16", "amx_bf16") if f in info.flags]
        onednn = mkldnn_bf16_usable()
        if isa and onednn:
            return DoctorResult(True, f"bf16 is fast here ({', '.join(isa)}, oneDNN bf16 usable); dtype=auto uses it")
        why = "no avx512_bf16/amx_bf16 in the CPU flags" if not isa else "torch's oneDNN reports no bf16 support"
        if c_bf16_kernels():
            return DoctorResult(True, f"bf16 runs on the C kernels' AVX2 + FMA GEMM and RMSNorm ({why}: bf16 "
                                "converted to float32 in registers); dtype=auto uses it for bf16 and GGUF checkpoints")
        return DoctorResult(True, f"bf16 would be emulated ({why}); dtype=auto uses float32",
                            "a CPU with AVX512-BF16 or AMX (Sapphire Rapids, Zen 4+) runs bf16 about 2x faster")
    except Exception as exc:
        return DoctorResult(False, f"could not check bf16 support: {type(exc).__name__}: {exc}")


def check_native_kernels() -> DoctorResult:
    """Whether the C attention/rotary/KV-write/GEMM kernels built; without them the torch paths run (slower)."""
    from llmctl_cpu import native

    ok, why = native.status()
    if ok:
        lib = native.kernels()
        gemm = ("bf16 GEMM on" if lib is not None and lib.has_gemm_bf16
                else "bf16 GEMM off: neither AVX512-BF16 nor AVX2 + FMA, oneDNN runs bf16 linears")
        if lib is not None and lib.has_gemm_bf16 and "avx512_bf16" not in cpu_info().flags:
            gemm += " (AVX2 + FMA: no bf16 dot products, bf16 converted to float32 in registers)"
        elif lib is not None and lib.has_gemm_bf16:
            gemm += (" (AMX tiles; bf16 decode attention on AMX too)" if lib.amx else
                     f" (AVX-512: AMX off by {native.AMX_ENV}=0)" if not native.env_on(native.AMX_ENV) else
                     " (AVX-512: no AMX on this CPU, or Linux refused the tile state)")
        rows = ("RMSNorm/argmax on" if lib is not None and lib.has_norm and lib.has_argmax
                else "RMSNorm/argmax off: neither AVX-512 nor AVX2 + FMA, torch runs them")
        return DoctorResult(True, f"C kernels available ({why}; {gemm}; {rows})")
    return DoctorResult(True, f"C kernels not available: {why}",
                        "install gcc or clang (or set CC) for the faster decode attention; unset "
                        f"{native.DISABLE_ENV} if it is 0")


def check_float32_linears() -> DoctorResult:
    """Which GEMM runs float32 linears here, and whether their rows are batch-invariant (see llmctl_cpu.f32_linear)."""
    from llmctl_cpu import f32_linear

    try:
        rep = f32_linear.report()
    except ValueError as exc:
        return DoctorResult(False, str(exc), f"set {f32_linear.PATH_ENV} to auto, c, mkl or onednn")
    if rep.batch_invariant:
        return DoctorResult(True, f"{rep.path}, batch-invariant ({rep.why})")
    return DoctorResult(True, f"{rep.path}: NOT batch-invariant ({rep.why})",
                        "install gcc or clang on an AVX2 host for the batch-invariant float32 C GEMM")


def doctor_checks() -> list[DoctorCheck]:
    return [DoctorCheck("cpu threads", check_threads), DoctorCheck("cpu bf16", check_bf16),
            DoctorCheck("cpu kernels", check_native_kernels),
            DoctorCheck("cpu float32 linears", check_float32_linears)]
