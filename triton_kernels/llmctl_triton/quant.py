"""Quantized linear layers on GPUs: a Triton dequantizing GEMM for core's int4 and int8 weight-only layouts, and
FP8 W8A8 through ``torch._scaled_mm`` where the GPU has FP8 matrix units.

The GEMM streams the packed codes and dequantizes each ``[BLOCK_K, BLOCK_N]`` tile in registers
(``q * scale + min``, per group along K), so a decode step reads 4 or 8 bits per weight instead of 16. It follows
the reference's arithmetic: float32 activations multiply float32 weights (no TF32), 16-bit activations multiply
weights rounded to their own dtype, and every product is summed in float32. W8A8 int8 layers quantize the
activations per token as the reference does and sum int8 products exactly in int32 on the integer matrix units.
Layers it cannot run (odd K for int4, fp8 weight-only) are declined with the reason, and core runs its torch
reference for them.

The kernels take plain tensors, so they run under ``TRITON_INTERPRET=1`` on the CPU, which is how the suite checks
them against the reference without a GPU.
"""

from __future__ import annotations

import torch
from llmctl.plugins.types import QuantLinearSpec, QuantMethod, Support

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def wq_gemm(x_ptr, q_ptr, s_ptr, m_ptr, b_ptr, y_ptr, M, N, K, group_size,
                sxm, sxk, sqn, sqk, ssn, ssg, smn, smg, sym, syn,
                BITS: tl.constexpr, HAS_MINS: tl.constexpr, HAS_BIAS: tl.constexpr, FP32: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0.0)
            wmask = (rk[:, None] < K) & (rn[None, :] < N)
            if BITS == 4:
                byte = tl.load(q_ptr + rn[None, :] * sqn + (rk[:, None] // 2) * sqk, mask=wmask, other=0)
                q = (byte.to(tl.int32) >> ((rk[:, None] % 2) * 4)) & 0xF
            else:
                q = tl.load(q_ptr + rn[None, :] * sqn + rk[:, None] * sqk, mask=wmask, other=0).to(tl.int32)
            g = rk[:, None] // group_size
            w = q.to(tl.float32) * tl.load(s_ptr + rn[None, :] * ssn + g * ssg, mask=wmask, other=0.0)
            if HAS_MINS:
                w = w + tl.load(m_ptr + rn[None, :] * smn + g * smg, mask=wmask, other=0.0)
            # UPCAST: the interpreter's bf16 matmul is wrong and its bf16 casts truncate, so fp32 weights there
            if FP32 or UPCAST:
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def w8a8_gemm(xq_ptr, xs_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, K, sxm, sxk, sqn, sqk, sym, syn,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(xq_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0)
            b = tl.load(q_ptr + rn[None, :] * sqn + rk[:, None] * sqk, mask=(rk[:, None] < K) & (rn[None, :] < N),
                        other=0)
            acc += tl.dot(a, b, out_dtype=tl.int32)  # exact integer sums, as the reference's
        xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
        ws = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
        out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, out.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    return triton, wq_gemm, w8a8_gemm


_compiled = None


def weight_only_gemm(x: torch.Tensor, weights: dict[str, torch.Tensor], bias: torch.Tensor | None,
                     spec: QuantLinearSpec) -> torch.Tensor:
    """``x [M, K] @ dequant(weights).T + bias`` in ``x``'s dtype, for the int4 and int8 weight-only layouts."""
    global _compiled
    if _compiled is None:
        _compiled = _kernel()
    triton, kernel, _ = _compiled
    from llmctl_triton._common import check_device, upcast_for_dot

    check_device(x)
    perm = weights.get("perm")
    x2 = (x if perm is None else x.index_select(-1, perm)).contiguous()
    q, scales, mins = weights["qweight"], weights["scales"], weights.get("mins")
    m, k = x2.shape
    n = spec.out_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 64
    block_n, block_k = 64, 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    mins_t = mins if mins is not None else scales  # never read without HAS_MINS
    bias_t = bias if bias is not None else y
    kernel[grid](x2, q, scales, mins_t, bias_t, y, m, n, k, spec.group_size,
                 x2.stride(0), x2.stride(1), q.stride(0), q.stride(1), scales.stride(0), scales.stride(1),
                 mins_t.stride(0), mins_t.stride(1), y.stride(0), y.stride(1),
                 BITS=spec.bits, HAS_MINS=mins is not None, HAS_BIAS=bias is not None,
                 FP32=x.dtype == torch.float32, UPCAST=upcast_for_dot(x.dtype),
                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def w8a8_gemm(x: torch.Tensor, weights: dict[str, torch.Tensor], bias: torch.Tensor | None,
              spec: QuantLinearSpec) -> torch.Tensor:
    """int8 W8A8: activations quantized per token (core's own rounding), int8 x int8 summed exactly in int32 on
    the integer matrix units, then ``sum * x_scale * w_scale (+ bias)`` in float32, as the reference."""
    global _compiled
    if _compiled is None:
        _compiled = _kernel()
    triton, _, kernel = _compiled
    from llmctl.quantization.reference import quantize_int8_per_token

    from llmctl_triton._common import check_device

    check_device(x)
    xq, xs = quantize_int8_per_token(x)
    xq, xs = xq.contiguous(), xs.reshape(-1).contiguous()
    q, scales = weights["qweight"], weights["scales"].reshape(-1).contiguous()
    m, k = xq.shape
    n = spec.out_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    kernel[grid](xq, xs, q, scales, bias if bias is not None else y, y, m, n, k, xq.stride(0), xq.stride(1),
                 q.stride(0), q.stride(1), y.stride(0), y.stride(1), HAS_BIAS=bias is not None,
                 BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32)
    return y


class TritonIntKernel(QuantMethod):
    """int4 weight-only (GPTQ, AWQ, compressed-tensors W4A16) and int8 weight-only or W8A8 (W8A16, per-channel
    W8A8 int8) layers."""

    def __init__(self, fmt: str, platform: str, priority: int = 10) -> None:
        self.name = fmt
        self.platforms = (platform,)
        self.priority = priority
        self.kernel = ("triton dequantizing GEMM (int4 weight-only)" if fmt == "int4" else
                       "triton GEMMs (int8 weight-only dequantizing; W8A8 on int8 matrix units)")

    def supports(self, spec: QuantLinearSpec, dtype: torch.dtype) -> Support:
        if spec.act == "int8" and spec.format == "int8":
            if spec.group_size != spec.in_features or spec.bits != 8:
                return Support(False, f"W8A8 int8 needs per-channel 8-bit weights (group_size {spec.group_size})")
            if dtype not in _ACT_DTYPES:
                return Support(False, f"activation dtype {dtype} (fp16, bf16 and float32 are supported)")
            return Support(True)
        if spec.act is not None:
            return Support(False, f"{spec.act} activations on {spec.format} weights")
        if dtype not in _ACT_DTYPES:
            return Support(False, f"activation dtype {dtype} (fp16, bf16 and float32 are supported)")
        if spec.format == "int4" and (spec.bits != 4 or spec.in_features % 2):
            return Support(False, f"int4 needs 4 bits and an even in_features (got {spec.bits}, {spec.in_features})")
        if spec.format == "int8" and spec.bits != 8:
            return Support(False, f"int8 needs 8 bits (got {spec.bits})")
        return Support(True)

    def apply(self, x: torch.Tensor, weights: dict[str, torch.Tensor], bias: torch.Tensor | None,
              spec: QuantLinearSpec) -> torch.Tensor:
        shape = x.shape
        gemm = w8a8_gemm if spec.act == "int8" else weight_only_gemm
        out = gemm(x.reshape(-1, shape[-1]), weights, bias, spec)
        return out.reshape(*shape[:-1], spec.out_features)


def fp8_matmul_support(device: torch.device | None = None) -> Support:
    """FP8 matrix units: NVIDIA compute capability 8.9 (Ada) and up, AMD MI300 (gfx94x) and up."""
    if not torch.cuda.is_available():
        return Support(False, "no GPU visible to torch")
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(device or 0).gcnArchName
        ok = arch.startswith(("gfx94", "gfx95", "gfx12"))
        return Support(ok, "" if ok else f"{arch} has no FP8 matrix instructions")
    cap = torch.cuda.get_device_capability(device)
    ok = cap >= (8, 9)
    return Support(ok, "" if ok else f"compute capability {cap[0]}.{cap[1]} has no FP8 tensor cores (8.9+)")


class ScaledMmFp8Kernel(QuantMethod):
    """FP8 W8A8 (per-tensor or per-channel weights; dynamic per-token or static per-tensor activations) on the
    GPU's FP8 matrix units, through ``torch._scaled_mm`` with the scales applied in its epilogue."""

    name = "fp8"

    def __init__(self, platform: str, priority: int = 10) -> None:
        self.platforms = (platform,)
        self.priority = priority
        self.kernel = "torch._scaled_mm (fp8 W8A8)"

    def supports(self, spec: QuantLinearSpec, dtype: torch.dtype) -> Support:
        if spec.act != "fp8":
            return Support(False, "fp8 weight-only layers run on the reference (dequantized to the activation dtype)")
        if dtype not in (torch.float16, torch.bfloat16):
            return Support(False, f"activation dtype {dtype}: _scaled_mm writes fp16 or bf16")
        if spec.in_features % 16 or spec.out_features % 16:
            return Support(False, f"_scaled_mm needs in/out features that are multiples of 16 "
                                  f"(got {spec.in_features}, {spec.out_features})")
        return fp8_matmul_support()

    def apply(self, x: torch.Tensor, weights: dict[str, torch.Tensor], bias: torch.Tensor | None,
              spec: QuantLinearSpec) -> torch.Tensor:
        from llmctl.quantization.reference import quantize_fp8

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs = quantize_fp8(x2, weights.get("input_scale"))
        w_scale = weights["scales"].to(torch.float32).reshape(1, -1)
        rows = xq.shape[0]
        if w_scale.numel() == 1 and xs.numel() == 1:  # per-tensor on both sides
            scale_a, scale_b = xs.reshape(()), w_scale.reshape(())
        else:  # row-wise: [M, 1] and [1, N]
            scale_a = xs.reshape(-1, 1).expand(rows, 1).contiguous()
            scale_b = w_scale.expand(1, spec.out_features).contiguous()
        out = torch._scaled_mm(xq, weights["qweight"].t(), scale_a=scale_a, scale_b=scale_b,
                               bias=None, out_dtype=x.dtype)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.reshape(*shape[:-1], spec.out_features)


def quant_methods(platform: str, priority: int = 10) -> list[QuantMethod]:
    return [TritonIntKernel("int4", platform, priority), TritonIntKernel("int8", platform, priority),
            ScaledMmFp8Kernel(platform, priority)]
