"""The CPU plugin's C kernels (``kernels.c``, a unity build of one file per kernel family in ``kernels/``): built
on first use with the host's C compiler, loaded with ctypes.

Why C and why this way: at decode batch sizes a torch composition of gather + pad + mask + SDPA spends more
time dispatching and copying than computing, and a kernel that walks the block table in place removes both.
Compiling here (``-march=native``, once per host: cached by source, compiler and CPU) needs no torch headers,
no build step at install time and no binary wheels per torch version. The shared object links the OpenMP
runtime by soname, so it reuses the ``libgomp.so.1`` torch already loaded instead of starting a second pool.

Everything degrades: without a compiler, with ``LLMCTL_CPU_NATIVE=0`` or when a build fails, :func:`kernels`
returns ``None``, :func:`status` says why, and callers keep their torch paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DISABLE_ENV = "LLMCTL_CPU_NATIVE"
AMX_ENV = "LLMCTL_CPU_AMX"  # 0 keeps bf16 GEMMs and attention on AVX-512 even where AMX is available
CACHE_ENV = "LLMCTL_CACHE_DIR"
SOURCE = Path(__file__).with_name("kernels.c")  # the unity build: #includes one file per family from kernels/
FAMILY_DIR = Path(__file__).with_name("kernels")
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp",
          "-fPIC", "-shared")

DT_F32, DT_BF16 = 0, 1
_DTYPE_CODES = {torch.float32: DT_F32, torch.bfloat16: DT_BF16}
# 8-bit KV cache formats (kernels/attention_kv8.c), by the cache tensor's dtype
KV8_CODES = {torch.int8: 0, torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}
MAX_ROTARY_HEAD_SIZE = 512  # kernels.c keeps one head in a stack buffer of this many floats

_c_ptr, _c_i64, _c_int, _c_float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def env_on(name: str) -> bool:
    """An on/off switch that defaults to on: "0", "false", "no" and "off" turn it off."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def dtype_code(dtype: torch.dtype) -> int | None:
    return _DTYPE_CODES.get(dtype)


class NativeKernels:
    """Typed entry points of the loaded library. Callers check dtypes/contiguity; these only pass pointers."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._attn = lib.llmctl_decode_attention
        self._attn.restype = _c_int
        self._attn.argtypes = [_c_int, _c_ptr, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_ptr, _c_int, _c_int, _c_int, _c_int,
                               _c_ptr, _c_i64, _c_ptr, _c_ptr, _c_ptr, _c_int, _c_int, _c_float, _c_i64, _c_int]
        self._attn_cap = lib.llmctl_decode_attention_capped
        self._attn_cap.restype = _c_int
        self._attn_cap.argtypes = [*self._attn.argtypes[:18], _c_ptr, *self._attn.argtypes[19:]]
        self._scale_caps: dict[tuple[float, float], torch.Tensor] = {}
        # quant.c's weight-only panel GEMM, called through its address so a recorded step can replay it too
        self._quant_wq = _call_at_address
        self._attn8 = lib.llmctl_decode_attention_kv8
        self._attn8.restype = _c_int
        self._attn8.argtypes = [_c_int, *self._attn.argtypes]
        self._write8 = lib.llmctl_write_kv8
        self._write8.restype = _c_int
        self._write8.argtypes = [_c_int, _c_int, _c_ptr, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_ptr, _c_ptr, _c_int,
                                 _c_int, _c_int, _c_i64, _c_int]
        self._write = lib.llmctl_write_kv
        self._write.restype = _c_int
        self._write.argtypes = [_c_int, _c_ptr, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_ptr, _c_ptr, _c_int, _c_int,
                                _c_i64, _c_int]
        self._rotary = lib.llmctl_rotary
        self._rotary.restype = _c_int
        self._rotary.argtypes = [_c_int, _c_ptr, _c_int, _c_ptr, _c_int, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_i64,
                                 _c_int, _c_int, _c_int, _c_int]
        self._pack = lib.llmctl_pack_bf16_panels
        self._pack.restype = None
        self._pack.argtypes = [_c_ptr, _c_i64, _c_int, _c_int, _c_ptr]
        self._gemm = lib.llmctl_gemm_bf16
        self._gemm.restype = _c_int
        self._gemm.argtypes = [_c_ptr, _c_i64, _c_int, _c_int, _c_ptr, _c_int, _c_ptr, _c_ptr, _c_i64, _c_int]
        self.has_gemm_bf16 = bool(lib.llmctl_has_gemm_bf16())
        self._pack_f32 = lib.llmctl_pack_f32_panels
        self._pack_f32.restype = None
        self._pack_f32.argtypes = self._pack.argtypes
        self._gemm_f32 = lib.llmctl_gemm_f32
        self._gemm_f32.restype = _c_int
        self._gemm_f32.argtypes = self._gemm.argtypes
        self.has_gemm_f32 = bool(lib.llmctl_has_gemm_f32())
        self._use_amx = lib.llmctl_use_amx
        self._use_amx.restype = _c_int
        self._use_amx.argtypes = [_c_int]
        self.use_amx(env_on(AMX_ENV))  # sets self.amx
        self.has_avx512 = bool(lib.llmctl_has_avx512())
        self.has_norm = self.has_avx512 or bool(lib.llmctl_has_avx2_fma())  # the C RMSNorm beats torch's passes
        self.has_argmax = self.has_norm  # eight lanes on AVX2 still beat torch's cast and argmax
        self.has_prefill_bf16 = bool(lib.llmctl_has_prefill_bf16())
        self._prefill = lib.llmctl_prefill_attention_bf16
        self._prefill.restype = _c_int
        self._prefill.argtypes = [_c_ptr, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_ptr, _c_int, _c_int, _c_int, _c_int,
                                  _c_ptr, _c_i64, _c_ptr, _c_int, _c_float, _c_i64, _c_int]
        self._norm = lib.llmctl_rms_norm
        self._norm.restype = _c_int
        self._norm.argtypes = [_c_int, _c_ptr, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_ptr, _c_i64, _c_int,
                               _c_int, _c_float, _c_int]
        self._argmax = lib.llmctl_argmax_rows
        self._argmax.restype = None
        self._argmax.argtypes = [_c_int, _c_ptr, _c_i64, _c_int, _c_int, _c_ptr, _c_int]
        self._sample = lib.llmctl_sample_softmax
        self._sample.restype = None
        self._sample.argtypes = [_c_ptr, _c_i64, _c_int, _c_int, _c_ptr, _c_ptr, _c_ptr, _c_ptr, _c_int]
        self._logprobs = lib.llmctl_sampled_logprobs
        self._logprobs.restype = None
        self._logprobs.argtypes = [_c_ptr, _c_i64, _c_int, _c_int, _c_ptr, _c_int, _c_ptr, _c_ptr, _c_ptr, _c_ptr,
                                   _c_ptr, _c_int]
        self._gemm_silu = lib.llmctl_gemm_bf16_silu
        self._gemm_silu.restype = _c_int
        self._gemm_silu.argtypes = self._gemm.argtypes
        self._silu_mul = lib.llmctl_silu_and_mul
        self._silu_mul.restype = _c_int
        self._silu_mul.argtypes = [_c_int, _c_ptr, _c_i64, _c_ptr, _c_i64, _c_int, _c_int, _c_int]
        self._gather = lib.llmctl_gather_rows
        self._gather.restype = _c_int
        self._gather.argtypes = [_c_ptr, _c_i64, _c_i64, _c_ptr, _c_int, _c_ptr]
        self._lora = lib.llmctl_lora_shrink_expand
        self._lora.restype = _c_int
        self._lora.argtypes = [_c_int, _c_ptr, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_ptr, _c_ptr, _c_ptr, _c_int, _c_int,
                               _c_int, _c_int, _c_int, _c_int]
        self._moe = lib.llmctl_fused_moe
        self._moe.restype = _c_int
        self._moe.argtypes = [_c_int, _c_ptr, _c_i64, _c_int, _c_int, _c_int, _c_int, _c_int, _c_ptr, _c_ptr, _c_ptr,
                              _c_ptr, _c_ptr, _c_i64, _c_int]
        self.has_fused_moe = bool(lib.llmctl_has_fused_moe())
        self._program_timing = lib.llmctl_program_timing
        self._program_timing.restype = None
        self._program_timing.argtypes = [_c_int, _c_ptr]
        self._run_program = lib.llmctl_run_program
        self._run_program.restype = _c_int
        self._run_program.argtypes = [_c_ptr, _c_int, _c_int, _c_int, ctypes.POINTER(_c_int)]

    def use_amx(self, on: bool) -> bool:
        """Run the bf16 GEMMs (k a multiple of 32) and bf16 decode attention on AMX tiles, where the CPU has them
        and Linux lets this process use them, or on AVX-512; returns whether AMX is on now. Both GEMM paths read
        the same packed panels, so this may change at any time."""
        self.amx = bool(self._use_amx(int(on)))
        return self.amx

    @contextlib.contextmanager
    def recording(self, calls: list[tuple[int, tuple[Any, ...]]]) -> Iterator[None]:
        """While open, every kernel call that a decode step makes still runs and is also appended to ``calls`` as
        ``(opcode, arguments)`` (see :data:`RECORDED_KERNELS`), for :func:`run_program` to replay."""
        saved = {attr: getattr(self, attr) for attr, _ in RECORDED_KERNELS.values()}

        def recorder(fn: Any, code: int) -> Any:
            def call(*args: Any) -> Any:
                calls.append((code, args))
                return fn(*args)
            return call

        try:
            for attr, code in RECORDED_KERNELS.values():
                setattr(self, attr, recorder(saved[attr], code))
            yield
        finally:
            for attr, fn in saved.items():
                setattr(self, attr, fn)

    def gather_rows(self, src: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
        """``out[i] = src[ids[i]]``: ``src`` [rows, d] and ``out`` [n, d] contiguous, ``ids`` int64 [n] contiguous."""
        bad = _bad_row(self._gather(src.data_ptr(), src.stride(0) * src.element_size(), src.shape[0],
                                    ids.data_ptr(), ids.shape[0], out.data_ptr()))
        if bad >= 0:
            raise IndexError(f"input_ids[{bad}] = {int(ids[bad])} is outside the vocabulary of {src.shape[0]}")

    def lora_shrink_expand(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                           token_slots: torch.Tensor, ranks: torch.Tensor) -> None:
        """``y[t] += B[s, :r].T @ (A[s, :r] @ x[t])`` in place, ``s = token_slots[t]`` (< 0: skipped), ``r =
        ranks[s]``. ``x`` [T, in] and ``y`` [T, out] with unit column stride; ``a`` [S, R, in] and ``b`` [S, R, out]
        contiguous, one dtype; ``token_slots`` int64 [T] and ``ranks`` int32 [S] (each <= R) contiguous."""
        slots, max_rank, in_features = a.shape
        rc = self._lora(_DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), a.data_ptr(),
                        b.data_ptr(), token_slots.data_ptr(), ranks.data_ptr(), x.shape[0], in_features, b.shape[2],
                        max_rank, slots, torch.get_num_threads())
        if rc == -2:
            raise MemoryError("lora_shrink_expand: the kernel could not allocate its scratch memory")
        if rc == -3:
            raise ValueError(f"lora_shrink_expand: ranks {ranks.tolist()} must be within [0, {max_rank}]")
        if rc > 0:
            raise IndexError(f"token_slots[{rc - 1}] = {int(token_slots[rc - 1])} is outside the {slots} LoRA slots")

    def fused_moe(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor, num_experts: int, intermediate: int) -> torch.Tensor:
        """``x`` [T, H] float32 or bf16 with unit column stride; ``w13`` / ``w2`` the experts' panels in x's dtype
        (``llmctl_cpu.moe``); ``ids`` int64 [T, k] and ``weights`` float32 [T, k] contiguous. Returns [T, H]."""
        t, h = x.shape
        out = torch.empty((t, h), dtype=x.dtype)
        rc = self._moe(_DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), t, h, intermediate, num_experts,
                       ids.shape[1], w13.data_ptr(), w2.data_ptr(), ids.data_ptr(), weights.data_ptr(),
                       out.data_ptr(), out.stride(0), torch.get_num_threads())
        if rc == -2:
            raise MemoryError("fused_moe: the kernel could not allocate its scratch memory")
        if rc > 0:
            bad = ids.reshape(-1)[rc - 1]
            raise IndexError(f"fused_moe: topk_ids holds expert {int(bad)}, outside the layer's {num_experts} experts")
        if rc != 0:
            raise RuntimeError(f"fused_moe: the kernel returned {rc}")
        return out

    def run_program(self, program: torch.Tensor, rows: int) -> tuple[int, int]:
        """Replay ``program`` (int64 [ops, PROGRAM_SLOTS], from :func:`encode_call`) at ``rows`` rows. Returns
        ``(-1, 0)``, or the index of the call that failed and its kernel's return code."""
        code = _c_int(0)
        rc = self._run_program(program.data_ptr(), program.shape[0], rows, torch.get_num_threads(),
                               ctypes.byref(code))
        return rc - 1, code.value

    def program_timing(self, on: bool) -> dict[str, float]:
        """Seconds spent per kernel kind in replayed programs since the previous call (nothing is counted while
        off); turns the per-call clock on or off from now."""
        ns = (ctypes.c_int64 * (OP_LAST + 1))()
        self._program_timing(int(on), ctypes.addressof(ns))
        return {OPCODE_NAMES[code]: ns[code] / 1e9 for code in OPCODE_NAMES if ns[code]}

    def decode_attention(self, query: torch.Tensor, out: torch.Tensor, kv_cache: torch.Tensor,
                         block_tables: torch.Tensor, tables: torch.Tensor, rows: torch.Tensor,
                         seq_lens: torch.Tensor, window: int | None, scale: float,
                         soft_cap: float | None = None) -> bool:
        """``query``/``out`` [T, H, D] with contiguous heads; ``kv_cache`` [2, blocks, block_size, Hk, D]
        contiguous; ``tables`` (int32), ``rows`` (int64), ``seq_lens`` (int32): one entry per decode. False when
        a block id is out of range or the kernel could not allocate its scratch. ``soft_cap`` (> 0): the scaled
        scores become ``tanh(s / cap) * cap`` before the softmax."""
        _, _, block_size, kv_heads, head_size = kv_cache.shape
        fn, scale_arg = self._attn, scale
        if soft_cap:
            fn, scale_arg = self._attn_cap, self._scale_cap(scale, soft_cap).data_ptr()
        rc = fn(_DTYPE_CODES[query.dtype], query.data_ptr(), query.stride(0), out.data_ptr(), out.stride(0),
                kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), block_size, kv_heads, head_size,
                query.shape[1], block_tables.data_ptr(), block_tables.stride(0), tables.data_ptr(),
                rows.data_ptr(), seq_lens.data_ptr(), rows.shape[0], window or 0, scale_arg,
                kv_cache.shape[1], torch.get_num_threads())
        return rc == 0

    def _scale_cap(self, scale: float, cap: float) -> torch.Tensor:
        """{scale, cap} as two floats the capped kernel reads, one tensor per pair for the process's lifetime (a
        recorded step keeps its address)."""
        key = (float(scale), float(cap))
        if key not in self._scale_caps:
            self._scale_caps[key] = torch.tensor(key, dtype=torch.float32)
        return self._scale_caps[key]

    def decode_attention_kv8(self, query: torch.Tensor, out: torch.Tensor, kv_cache: torch.Tensor,
                             block_tables: torch.Tensor, tables: torch.Tensor, rows: torch.Tensor,
                             seq_lens: torch.Tensor, window: int | None, scale: float) -> bool:
        """As :meth:`decode_attention` over an 8-bit ``kv_cache`` [2, blocks, block_size, Hk, D + 4] (codes and
        each row's float32 scale, ``llmctl.kv.cache_dtype``); ``query``/``out`` float32 or bf16 [T, H, D]."""
        _, _, block_size, kv_heads, _ = kv_cache.shape
        rc = self._attn8(KV8_CODES[kv_cache.dtype], _DTYPE_CODES[query.dtype], query.data_ptr(), query.stride(0),
                         out.data_ptr(), out.stride(0), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), block_size,
                         kv_heads, query.shape[2], query.shape[1], block_tables.data_ptr(), block_tables.stride(0),
                         tables.data_ptr(), rows.data_ptr(), seq_lens.data_ptr(), rows.shape[0], window or 0, scale,
                         kv_cache.shape[1], torch.get_num_threads())
        return rc == 0

    def write_kv8(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
        """Quantize ``key``/``value`` (float32 or bf16 [n, Hk, D], rows of ``Hk * D`` contiguous) into an 8-bit
        cache, one scale per token and head, with the bytes the torch reference writes."""
        num_slots = kv_cache.shape[1] * kv_cache.shape[2]
        bad = _bad_row(self._write8(KV8_CODES[kv_cache.dtype], _DTYPE_CODES[key.dtype], key.data_ptr(),
                                    key.stride(0), value.data_ptr(), value.stride(0), kv_cache[0].data_ptr(),
                                    kv_cache[1].data_ptr(), slots.data_ptr(), slots.shape[0], key.shape[1],
                                    key.shape[2], num_slots, torch.get_num_threads()))
        if bad >= 0:
            raise IndexError(f"slot_mapping[{bad}] = {int(slots[bad])} is outside the KV cache's {num_slots} slots")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (and ``residual``) [rows, d] with unit stride along d, ``weight`` d contiguous, all one dtype.
        Returns ``(rms_norm(h) * weight, h)`` with ``h = x + residual`` (new tensors), or ``(rms_norm(x) * weight,
        None)`` without a residual."""
        rows, d = x.shape
        out = torch.empty((rows, d), dtype=x.dtype)
        summed = None if residual is None else torch.empty((rows, d), dtype=x.dtype)
        res_ptr, res_stride = (None, 0) if residual is None else (residual.data_ptr(), residual.stride(0))
        rc = self._norm(_DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), res_ptr, res_stride,
                        None if summed is None else summed.data_ptr(), d, weight.data_ptr(), out.data_ptr(), d, rows,
                        d, eps, torch.get_num_threads())
        if rc != 0:
            raise MemoryError("rms_norm: the kernel could not allocate its scratch memory")
        return out, summed

    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [rows, n] (n >= 1) with unit stride along n -> int64 [rows], as ``torch.argmax(x, -1)``."""
        rows, n = x.shape
        out = torch.empty(rows, dtype=torch.int64)
        self._argmax(_DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), rows, n, out.data_ptr(), torch.get_num_threads())
        return out

    def sampled_logprobs(self, x: torch.Tensor, chosen: torch.Tensor, k: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` float32 [rows, n] with unit stride along n, ``chosen`` int64 [rows] contiguous, 0 <= k <= n ->
        (log-normaliser [rows], rank [rows], top values [rows, k] (raw logits), top ids [rows, k], bad rows
        [rows] bool: a NaN or +inf, for the caller's reference)."""
        rows, n = x.shape
        lse = torch.empty(rows, dtype=torch.float32)
        rank = torch.empty(rows, dtype=torch.int64)
        vals = torch.empty(rows, k, dtype=torch.float32)
        ids = torch.empty(rows, k, dtype=torch.int64)
        bad = torch.empty(rows, dtype=torch.int8)
        self._logprobs(x.data_ptr(), x.stride(0), rows, n, chosen.data_ptr(), k, lse.data_ptr(), rank.data_ptr(),
                       vals.data_ptr(), ids.data_ptr(), bad.data_ptr(), torch.get_num_threads())
        return lse, rank, vals, ids, bad.bool()

    def sample_softmax(self, x: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` float32 [rows, n] with unit stride along n, ``temperatures`` and ``uniforms`` float32 [rows]
        contiguous -> (token ids [rows], bad rows [rows] bool: a NaN, +inf, every logit -inf or a temperature that
        is not a positive finite number, for the caller's reference)."""
        rows, n = x.shape
        out = torch.empty(rows, dtype=torch.int64)
        bad = torch.empty(rows, dtype=torch.int8)
        self._sample(x.data_ptr(), x.stride(0), rows, n, temperatures.data_ptr(), uniforms.data_ptr(), out.data_ptr(),
                     bad.data_ptr(), torch.get_num_threads())
        return out, bad.bool()

    def prefill_attention_bf16(self, query: torch.Tensor, out: torch.Tensor, kv_cache: torch.Tensor,
                               block_tables: torch.Tensor, chunks: torch.Tensor, scale: float) -> bool:
        """bf16 ``query``/``out`` [T, H, D] with contiguous heads, ``kv_cache`` [2, blocks, block_size, Hk, D]
        contiguous, ``block_tables`` int32 contiguous, ``chunks`` int32 [n, 4]: (table, first row, query length,
        sequence length) per prefill chunk. False when a block id is out of range or scratch could not be had."""
        _, _, block_size, kv_heads, head_size = kv_cache.shape
        rc = self._prefill(query.data_ptr(), query.stride(0), out.data_ptr(), out.stride(0), kv_cache[0].data_ptr(),
                           kv_cache[1].data_ptr(), block_size, kv_heads, head_size, query.shape[1],
                           block_tables.data_ptr(), block_tables.stride(0), chunks.data_ptr(), chunks.shape[0], scale,
                           kv_cache.shape[1], torch.get_num_threads())
        return rc == 0

    def pack_bf16_panels(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` [n, k] bf16 with unit stride along k -> the GEMM's panels: [ceil(n/16), ceil(k/2), 32]."""
        n, k = weight.shape
        out = torch.empty(((n + 15) // 16, (k + 1) // 2, 32), dtype=torch.bfloat16)
        self._pack(weight.data_ptr(), weight.stride(0), n, k, out.data_ptr())
        return out

    def gemm_bf16(self, x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
        """``x`` [m, k] bf16 with unit stride along k; ``bias`` n bf16 contiguous or None. Returns [m, n]."""
        m, k = x.shape
        y = torch.empty((m, n), dtype=torch.bfloat16)
        rc = self._gemm(x.data_ptr(), x.stride(0), m, k, panels.data_ptr(), n,
                        None if bias is None else bias.data_ptr(), y.data_ptr(), n, torch.get_num_threads())
        if rc == -2:
            raise MemoryError(f"gemm_bf16: no memory for the float32 copy of {m} x {k} input rows")
        return y

    def gemm_bf16_silu(self, x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None
                       ) -> torch.Tensor:
        """``panels`` from :meth:`pack_bf16_panels` of gate and up rows interleaved 16 at a time (``n`` rows in all,
        a multiple of 32), ``bias`` in the same order. Returns ``silu(gate) * up``, [m, n / 2]."""
        m, k = x.shape
        y = torch.empty((m, n // 2), dtype=torch.bfloat16)
        rc = self._gemm_silu(x.data_ptr(), x.stride(0), m, k, panels.data_ptr(), n,
                             None if bias is None else bias.data_ptr(), y.data_ptr(), n // 2, torch.get_num_threads())
        if rc == -2:
            raise MemoryError(f"gemm_bf16_silu: no memory for the float32 copy of {m} x {k} input rows")
        if rc != 0:
            raise ValueError(f"gemm_bf16_silu: {n} output rows is not a multiple of 32")
        return y

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [m, 2 * d] float32 or bf16 with unit column stride -> ``silu(x[:, :d]) * x[:, d:]`` [m, d], rounded
        where torch's ``silu_and_mul`` rounds (its SiLU is a polynomial exp's, a float32 ulp or two from torch's)."""
        m, d = x.shape[0], x.shape[1] // 2
        out = torch.empty((m, d), dtype=x.dtype)
        if m:
            self._silu_mul(_DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), out.data_ptr(), d, m, d,
                           torch.get_num_threads())
        return out

    def pack_f32_panels(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` [n, k] float32 with unit stride along k -> the float32 GEMM's panels: [ceil(n/16), k, 16]."""
        n, k = weight.shape
        out = torch.empty(((n + 15) // 16, k, 16), dtype=torch.float32)
        self._pack_f32(weight.data_ptr(), weight.stride(0), n, k, out.data_ptr())
        return out

    def gemm_f32(self, x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
        """``x`` [m, k] float32 with unit stride along k; ``bias`` n float32 contiguous or None. Returns [m, n]."""
        m, k = x.shape
        y = torch.empty((m, n), dtype=torch.float32)
        self._gemm_f32(x.data_ptr(), x.stride(0), m, k, panels.data_ptr(), n,
                       None if bias is None else bias.data_ptr(), y.data_ptr(), n, torch.get_num_threads())
        return y

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
        """``key``/``value`` [n, Hk, D] with contiguous rows of ``Hk * D``; ``slots`` int64 contiguous."""
        num_slots = kv_cache.shape[1] * kv_cache.shape[2]
        bad = _bad_row(self._write(_DTYPE_CODES[kv_cache.dtype], key.data_ptr(), key.stride(0), value.data_ptr(),
                                   value.stride(0), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), slots.data_ptr(),
                                   slots.shape[0], key.shape[1] * key.shape[2], num_slots, torch.get_num_threads()))
        if bad >= 0:
            raise IndexError(f"slot_mapping[{bad}] = {int(slots[bad])} is outside the KV cache's {num_slots} slots")

    def rotary(self, positions: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, cos_sin: torch.Tensor,
               neox: bool) -> None:
        """``src``/``dst`` [T, heads, D] with contiguous heads; ``cos_sin`` [max_position, rot] float32."""
        bad = _bad_row(self._rotary(_DTYPE_CODES[src.dtype], positions.data_ptr(), positions.shape[0],
                                    cos_sin.data_ptr(), cos_sin.shape[1], cos_sin.shape[0], src.data_ptr(),
                                    src.stride(0), dst.data_ptr(), dst.stride(0), src.shape[1], src.shape[2],
                                    int(neox), torch.get_num_threads()))
        if bad >= 0:
            raise IndexError(f"positions[{bad}] = {int(positions[bad])} is outside the rotary table's "
                             f"{cos_sin.shape[0]} positions")


_CALL_TARGETS: dict[int, Any] = {}


def call_target(fn: Any) -> int:
    """The address of a ctypes function of another library (quant.c's), which :func:`_call_at_address` and a
    replayed program's QUANT_GEMM_WQ record call."""
    address = ctypes.cast(fn, ctypes.c_void_p).value
    _CALL_TARGETS[address] = fn
    return address


def _call_at_address(address: int, *args: Any) -> int:
    return _CALL_TARGETS[address](*args)


def _bad_row(rc: int) -> int:
    """The kernels' one convention: 0 on success, 1 + the index of the first bad row when a row's index (token,
    position, slot) is out of range, negative for anything else. Returns that row, or -1."""
    if rc < 0:
        raise RuntimeError(f"CPU kernel failed with code {rc}")
    return rc - 1


def _program_abi() -> tuple[int, list[tuple[str, int, str, str, int, int]]]:
    """The replay program's ABI, read from the table kernels/program_abi.h that the C side compiles: the slot count
    and one (NAME, opcode, recorded kernel, NativeKernels attribute, row-count argument, float argument or -1) row
    per kernel."""
    text = (FAMILY_DIR / "program_abi.h").read_text()
    slots = int(re.search(r"#define PROGRAM_SLOTS (\d+)", text).group(1))
    rows = [(m[1], int(m[2]), m[3], m[4], int(m[5]), int(m[6])) for m in re.finditer(
        r"X\((\w+), (\d+), (\w+), (\w+), (-?\d+), (-?\d+)\)", text)]
    if [r[1] for r in rows] != list(range(1, len(rows) + 1)):
        raise RuntimeError("program_abi.h: opcodes must run 1..n without gaps")
    return slots, rows


PROGRAM_SLOTS, _ABI = _program_abi()  # int64 words per recorded call (the opcode, then its arguments)
OPCODES = {name: code for name, code, *_ in _ABI}
(OP_GATHER, OP_RMS_NORM, OP_GEMM, OP_GEMM_SILU, OP_ROTARY, OP_WRITE_KV, OP_DECODE_ATTENTION,
 OP_GEMM_F32, OP_WRITE_KV8, OP_DECODE_ATTENTION_KV8) = (
    OPCODES[n] for n in ("GATHER", "RMS_NORM", "GEMM", "GEMM_SILU", "ROTARY", "WRITE_KV", "DECODE_ATTENTION",
                         "GEMM_F32", "WRITE_KV8", "DECODE_ATTENTION_KV8"))
OP_LAST = len(_ABI)
# The kernels a recorded decode step may contain: name -> (NativeKernels attribute, opcode); for each opcode the
# argument that carries the row count (replaced at replay, as is the thread count) and the float arguments.
RECORDED_KERNELS = {kernel: (attr, code) for _, code, kernel, attr, *_ in _ABI}
OPCODE_NAMES = {code: name for name, (_, code) in RECORDED_KERNELS.items()}
ROWS_ARG = {code: rows_arg for _, code, _, _, rows_arg, _ in _ABI}
FLOAT_ARGS = {code: (float_arg,) for _, code, _, _, _, float_arg in _ABI if float_arg >= 0}


def encode_call(code: int, args: tuple[Any, ...]) -> list[int]:
    """One recorded call as the int64 words ``llmctl_run_program`` reads."""
    floats = FLOAT_ARGS.get(code, ())
    words = [code]
    for i, a in enumerate(args):
        if i in floats:
            words.append(struct.unpack("<I", struct.pack("<f", float(a)))[0])
        elif a is None:
            words.append(0)
        elif isinstance(a, (bool, int)):
            words.append(int(a))
        else:
            raise TypeError(f"{OPCODE_NAMES[code]}: argument {i} is {type(a).__name__}, not an int or a pointer")
    if len(words) > PROGRAM_SLOTS:
        raise ValueError(f"{OPCODE_NAMES[code]}: {len(args)} arguments do not fit a program slot")
    return words + [0] * (PROGRAM_SLOTS - len(words))


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llmctl")
    return Path(root) / "cpu-kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def source_files() -> list[Path]:
    """kernels.c and every file it may include from kernels/, in a fixed order: all of them key the build cache."""
    return [SOURCE, *sorted(p for p in FAMILY_DIR.iterdir() if p.suffix in (".c", ".h"))]


def _build(cc: str) -> Path:
    """Compile kernels.c into the cache (atomically: concurrent first starts may race) and return the .so path."""
    source = b"\0".join(path.read_bytes() for path in source_files())
    key = hashlib.sha256(b"\0".join([source, cc.encode(), _compiler_version(cc).encode(), " ".join(CFLAGS).encode(),
                                     platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:20]
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / "llmctl-cpu-kernels"):
        target = directory / f"kernels-{key}.so"
        if target.exists():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
        except OSError:
            continue  # cache not writable: try the next location
        try:
            proc = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"{Path(cc).name} failed: {proc.stderr.strip()[-500:]}")
            os.replace(tmp, target)
            logger.info("built CPU kernels with %s into %s", cc, target)
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"no writable cache directory for the compiled kernels (tried {_cache_dir()} and the temp dir)")


@functools.cache
def _load() -> tuple[NativeKernels | None, str]:
    if not env_on(DISABLE_ENV):
        return None, f"disabled by {DISABLE_ENV}=0"
    if platform.system() != "Linux":
        return None, f"only built on Linux (this is {platform.system()})"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc/clang); using the torch paths"
    try:
        path = _build(cc)
        return NativeKernels(ctypes.CDLL(str(path)), path), f"built with {Path(cc).name}: {path}"
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("CPU kernels unavailable, using the torch paths: %s", exc)
        return None, f"build failed: {exc}"


def kernels() -> NativeKernels | None:
    """The loaded kernels, or None (see :func:`status` for why)."""
    return _load()[0]


def status() -> tuple[bool, str]:
    lib, reason = _load()
    return lib is not None, reason
