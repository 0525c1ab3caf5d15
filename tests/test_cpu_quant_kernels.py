"""The CPU plugin's quantized GEMMs equal core's torch reference (the oracle) on odd shapes at 1, 7, 64 and 300
rows, with and without bias, in float32 and bfloat16 activations."""

from __future__ import annotations

import pytest
import torch
from llmctl.plugins.types import QuantLinearSpec
from llmctl.quantization.packing import pack_nibbles
from llmctl.quantization.reference import reference_linear
from llmctl_cpu.quant import CpuInt4Kernel, CpuW8A8Kernel, quant_kernels

ROWS = (1, 7, 64, 300)

pytestmark = pytest.mark.skipif(quant_kernels() is None, reason="no C compiler for the CPU kernels")


def _run(kernel, weights, spec, x, bias):
    assert kernel.supports(spec, x.dtype), kernel.supports(spec, x.dtype).reason
    processed = kernel.process_weights(dict(weights), spec)
    return kernel.apply(x, processed, bias, spec)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_equals_reference(m, dtype):
    if not quant_kernels().has_w8a8:
        pytest.skip("neither AVX512-VNNI nor AVX2 in this build")
    torch.manual_seed(m)
    n, k = 37, 203  # neither a multiple of the 16-column panels nor of the 4-wide k quads
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    weights = {"qweight": q, "scales": torch.rand(n, 1) * 0.02}
    spec = QuantLinearSpec(format="int8", in_features=k, out_features=n, bits=8, group_size=k, act="int8")
    x = (torch.randn(m, k) * 3).to(dtype)
    bias = torch.randn(n).to(dtype)
    got = _run(CpuW8A8Kernel(), weights, spec, x, bias)
    want = reference_linear(x, weights, bias, spec)
    assert got.dtype == dtype
    # the int32 sums are exact and the float epilogue is the reference's, op for op
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(("m", "n", "k"), [(16, 37, 203), (17, 64, 256), (64, 100, 64), (300, 37, 1000),
                                         (33, 16, 75)])
def test_w8a8_amx_tiles_equal_vnni_bit_for_bit(m, n, k):
    """AMX-INT8 (16-row blocks, four panels, a k tail past the last whole tile added with VNNI) sums the same exact
    integers as VNNI: equal outputs, so the path switching with the row count keeps rows batch-invariant."""
    lib = quant_kernels()
    if not lib.has_vnni or not lib.use_amx(True):
        lib.use_amx(True)
        pytest.skip("no AMX-INT8 on this host (or Linux refused this process the tile state)")
    torch.manual_seed(m * 1000 + n)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    panels, colsum = lib.pack_int8(q)
    scales = torch.rand(n) * 0.02
    bias = torch.randn(n)
    x = torch.randn(m, k) * 3
    try:
        on = lib.gemm_w8a8(x, panels, colsum, scales, bias, n)
        lib.use_amx(False)
        off = lib.gemm_w8a8(x, panels, colsum, scales, bias, n)
        alone = torch.cat([lib.gemm_w8a8(x[i:i + 1], panels, colsum, scales, bias, n) for i in (0, m - 1)])
    finally:
        lib.use_amx(True)
    assert torch.equal(on, off)
    assert torch.equal(alone, on[[0, m - 1]])  # one row (VNNI) equals the same row inside the AMX batch
    spec = QuantLinearSpec(format="int8", in_features=k, out_features=n, bits=8, group_size=k, act="int8")
    want = reference_linear(x, {"qweight": q, "scales": scales.reshape(n, 1)}, bias, spec)
    torch.testing.assert_close(on, want, rtol=0, atol=0)


def _groupwise(n, k, group, bits, asym, seed):
    torch.manual_seed(seed)
    g = k // group
    if bits == 4:
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        weights = {"qweight": pack_nibbles(q), "scales": torch.rand(n, g) * 0.1, "mins": -torch.rand(n, g)}
    else:
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        weights = {"qweight": q, "scales": torch.rand(n, g) * 0.01}
        if asym:
            weights["mins"] = torch.randn(n, g) * 0.1
    return weights


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(("bits", "group", "asym"), [(4, 32, True), (4, 128, True), (8, 32, False), (8, 64, True),
                                                     (8, 16, False), (8, 16, True)])
def test_weight_only_equals_reference(m, bits, group, asym):
    n, k = 45, 256
    weights = _groupwise(n, k, group, bits, asym, seed=m + bits)
    spec = QuantLinearSpec(format=f"int{bits}", in_features=k, out_features=n, bits=bits, group_size=group)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    kernel = CpuInt4Kernel() if bits == 4 else CpuW8A8Kernel()
    got = _run(kernel, weights, spec, x, bias)
    want = reference_linear(x, weights, bias, spec)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_act_order_permutation_and_bf16():
    n, k, group = 24, 128, 32
    weights = _groupwise(n, k, group, 4, True, seed=3)
    weights["perm"] = torch.randperm(k)
    spec = QuantLinearSpec(format="int4", in_features=k, out_features=n, bits=4, group_size=group)
    x = torch.randn(7, k).to(torch.bfloat16)
    got = _run(CpuInt4Kernel(), weights, spec, x, None)
    want = reference_linear(x, weights, None, spec)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)  # one bf16 rounding apart


def test_declines_group_sizes_it_does_not_run():
    spec = QuantLinearSpec(format="int4", in_features=96, out_features=8, bits=4, group_size=48)
    answer = CpuInt4Kernel().supports(spec, torch.float32)
    assert not answer and "48" in answer.reason


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("group", [32, 128])
def test_int4_bf16_activations_equal_reference(m, group):
    """bf16 activations take the bf16 dot-product path: exact products, float32 sums, one bf16 rounding at the end."""
    n, k = 45, 384
    weights = _groupwise(n, k, group, 4, True, seed=m)
    spec = QuantLinearSpec(format="int4", in_features=k, out_features=n, bits=4, group_size=group)
    x = torch.randn(m, k).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16)
    got = _run(CpuInt4Kernel(), weights, spec, x, bias).float()
    want = reference_linear(x, weights, bias, spec).float()
    torch.testing.assert_close(got, want, rtol=8e-3, atol=2e-2)


def test_testkit_clause_passes_the_cpu_kernels_and_fails_a_broken_one():
    from llmctl_testkit.harness import ContractViolation
    from llmctl_testkit.quant_checks import check_quant_kernel

    assert check_quant_kernel(CpuInt4Kernel(), torch.device("cpu"), torch.float32) == 3

    class DropsMins(CpuInt4Kernel):
        def process_weights(self, weights, spec):
            out = super().process_weights(weights, spec)
            key = "mpanels" if "mpanels" in out else "mins"  # AVX2 builds repack into panels
            out[key] = torch.zeros_like(out[key])
            return out

    with pytest.raises(ContractViolation, match="quantization.int4"):
        check_quant_kernel(DropsMins(), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("m", ROWS)
def test_gguf_k_quants_run_on_the_group_kernels(type_name, m, monkeypatch):
    """Q4_K/Q5_K/Q6_K unpack to int4/int8 groups (32, 32 and 16), which the CPU kernels run: equal to the gguf
    package's own dequantized weight within float rounding (float activations: the int8-activation path is checked
    against its own arithmetic above)."""
    from llmctl_cpu.quant import INT8_ACT_ENV

    monkeypatch.setenv(INT8_ACT_ENV, "0")
    import sys
    from pathlib import Path

    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from llmctl.quantization.gguf import convert_blocks

    sys.path.insert(0, str(Path(__file__).parent))
    from test_quantization_formats import gguf_blocks

    n, k = 40, 512
    raw = gguf_blocks(type_name, n, k)
    fmt, weights, group = convert_blocks(torch.from_numpy(raw), type_name, k)
    spec = QuantLinearSpec(format=fmt, in_features=k, out_features=n, bits=4 if fmt == "int4" else 8,
                           group_size=group, ggml_type=type_name)
    kernel = CpuInt4Kernel() if fmt == "int4" else CpuW8A8Kernel()
    x = torch.randn(m, k)
    got = _run(kernel, weights, spec, x, None)
    dense = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).copy())
    torch.testing.assert_close(got, x @ dense.t(), rtol=1e-4, atol=1e-4)


def _kblocks(type_name, n, k, seed=0):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_quantization_formats import gguf_blocks

    return gguf_blocks(type_name, n, k, seed)


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K"])
def test_q2k_q3k_unpack_exactly_into_int8_groups_of_16(type_name):
    """The plugin's unpacking gives the gguf package's dequantized floats bit for bit (q * scale + min)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from llmctl.quantization.packing import dequant_int8
    from llmctl_cpu.quant_kblocks import unpack_kblocks

    raw = _kblocks(type_name, 6, 512, seed=5)
    w = unpack_kblocks(torch.from_numpy(raw), type_name, 512)
    assert w["qweight"].dtype == torch.int8 and w["scales"].shape == (6, 32)
    lo, hi = (0, 3) if type_name == "Q2_K" else (-4, 3)
    assert int(w["qweight"].min()) == lo and int(w["qweight"].max()) == hi
    theirs = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).copy())
    assert torch.equal(dequant_int8(w["qweight"], w["scales"], w.get("mins")), theirs)


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K"])
@pytest.mark.parametrize("m", ROWS)
def test_q2k_q3k_kernel_equals_reference(type_name, m):
    from llmctl_cpu.quant_kblocks import CpuKBlockKernel

    n, k = 37, 512
    raw = torch.from_numpy(_kblocks(type_name, n, k, seed=m))
    spec = QuantLinearSpec(format="gguf", in_features=k, out_features=n, bits=int(type_name[1]), group_size=256,
                           ggml_type=type_name)
    weights = {"qweight": raw}
    x = torch.randn(m, k)
    bias = torch.randn(n)
    got = _run(CpuKBlockKernel(), weights, spec, x, bias)
    torch.testing.assert_close(got, reference_linear(x, weights, bias, spec), rtol=1e-4, atol=1e-4)
    assert not CpuKBlockKernel().supports(
        QuantLinearSpec(format="gguf", in_features=k, out_features=n, bits=4, group_size=32, ggml_type="IQ4_NL"),
        torch.float32)


@pytest.mark.parametrize(("bits", "group", "asym"), [(4, 32, True), (8, 16, True), (8, 64, False)])
def test_weight_only_rows_do_not_depend_on_the_batch(bits, group, asym):
    """One row alone (dequantized in registers) equals the same row inside 7- and 300-row batches (panel dequantized
    once, 6-row tiles): the same float operations in the same order, whichever path the row count picks."""
    n, k = 37, 192
    weights = _groupwise(n, k, group, bits, asym, seed=11)
    spec = QuantLinearSpec(format=f"int{bits}", in_features=k, out_features=n, bits=bits, group_size=group)
    kernel = CpuInt4Kernel() if bits == 4 else CpuW8A8Kernel()
    processed = kernel.process_weights(dict(weights), spec)
    x = torch.randn(300, k)
    full = kernel.apply(x, processed, None, spec)
    for m in (1, 3, 4, 5, 7, 64):
        assert torch.equal(kernel.apply(x[:m], processed, None, spec), full[:m]), m
    assert torch.equal(kernel.apply(x[299:], processed, None, spec), full[299:])


@pytest.mark.parametrize("bits", [4, 8])
def test_bf16_activations_on_the_panels_equal_the_float32_call_rounded(bits):
    """bf16 rows go to the AVX2 panel GEMM as they are (a replayable decode step has no torch conversions around
    it): the result equals the float32 call on the widened rows, bias included, rounded to bf16 as torch rounds."""
    lib = quant_kernels()
    if not lib.has_avx2:
        pytest.skip("the panel GEMM is the AVX2 + FMA build's")
    n, k, group = 37, 192, 32
    weights = _groupwise(n, k, group, bits, True, seed=5)
    spec = QuantLinearSpec(format=f"int{bits}", in_features=k, out_features=n, bits=bits, group_size=group)
    kernel = CpuInt4Kernel() if bits == 4 else CpuW8A8Kernel()
    processed = kernel.process_weights(dict(weights), spec)
    bias = torch.randn(n)
    for m in (1, 7):
        x = torch.randn(m, k).to(torch.bfloat16)
        x[0, :3] = torch.tensor([1e30, -1e-30, 0.0])  # large and tiny values round like torch's conversion
        got = kernel.apply(x, processed, bias.to(torch.bfloat16), spec)
        want = kernel.apply(x.float(), processed, bias.to(torch.bfloat16).float(), spec).to(torch.bfloat16)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_after_the_gate_up_gemm_equals_the_two_ops(dtype):
    """The weight-only kernels' gate/up epilogue (the kernels library's SiLU-and-mul) against the GEMM followed by
    core's silu_and_mul: bf16 rounds where torch rounds (equal bits), float32 within its SiLU's ulps."""
    from llmctl.ops.reference import silu_and_mul

    n, k = 90, 128  # 45 gate rows, 45 up rows: neither a multiple of the 8 lanes
    for bits, kernel in ((4, CpuInt4Kernel()), (8, CpuW8A8Kernel())):
        weights = _groupwise(n, k, 32, bits, True, seed=bits)
        spec = QuantLinearSpec(format=f"int{bits}", in_features=k, out_features=n, bits=bits, group_size=32)
        processed = kernel.process_weights(dict(weights), spec)
        if not kernel.fuses_silu_and_mul(processed, spec):
            pytest.skip("the CPU kernels library is not built here")
        x, bias = (torch.randn(2, 5, k) * 3).to(dtype), torch.randn(n).to(dtype)
        got = kernel.apply_silu_and_mul(x, processed, bias, spec)
        want = silu_and_mul(kernel.apply(x, processed, bias, spec))
        assert got.shape == (2, 5, n // 2) and got.dtype == dtype
        if dtype == torch.bfloat16:
            assert torch.equal(got, want), bits
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _act8_emulated(x, weights, bits, group, bias):
    """The int8-activation GEMM's arithmetic in float64 torch: blocks of 32 quantized as the kernel documents
    (d = amax / 127, round half to even), exact integer block sums, then scales and mins per group."""
    m, k = x.shape
    xb = x.float().reshape(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    d = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    xq = torch.round(xb / d).clamp(-127, 127)
    q = weights["qweight"]
    if bits == 4:
        q = torch.stack([q & 15, q >> 4], -1).reshape(q.shape[0], k)
    n, bpg = q.shape[0], group // 32
    isum = torch.einsum("mbi,nbi->mnb", xq.double(), q.double().reshape(n, k // 32, 32))
    part = (isum * d.double().reshape(m, 1, -1)).reshape(m, n, k // group, bpg).sum(-1)
    y = (part * weights["scales"].double()).sum(-1)
    if weights.get("mins") is not None:
        xs = (d.squeeze(-1).double() * xq.sum(-1).double()).reshape(m, k // group, bpg).sum(-1)
        y = y + xs @ weights["mins"].double().t()
    if bias is not None:
        y = y + bias.double()
    return y, xq.reshape(m, k).to(torch.int8), d.reshape(m, -1)


_ACT8_CASES = [(4, 32, True, "Q4_1"), (4, 128, True, "Q4_K"), (8, 32, False, "Q8_0"), (8, 64, True, "Q5_1")]
_FP16_SCALES = ("Q4_1", "Q8_0")  # scales (and mins) fp16 in the file: packed as fp16 (one case with mins, one without)


@pytest.mark.parametrize(("bits", "group", "asym", "type_name"), _ACT8_CASES)
def test_gguf_layers_on_int8_activations_equal_their_arithmetic(bits, group, asym, type_name, monkeypatch):
    """GGUF layers (AVX2 builds) run on int8 activations in blocks of 32, as llama.cpp: equal to that arithmetic in
    float64 at 1, 7, 64 and 300 rows (odd n), each row equal to itself alone (batch-invariant), bf16 rows equal to the
    float32 call rounded; and within int8 rounding of the float-activation reference."""
    from llmctl_cpu.quant import INT8_ACT_ENV

    monkeypatch.setenv(INT8_ACT_ENV, "1")
    lib = quant_kernels()
    if not lib.has_avx2:
        pytest.skip("the int8-activation GEMM is the AVX2 build's")
    n, k = 45, 384
    weights = _groupwise(n, k, group, bits, asym, seed=group + bits)
    if type_name in _FP16_SCALES:
        weights = {key: v.half().float() if v.is_floating_point() else v for key, v in weights.items()}
    spec = QuantLinearSpec(format=f"int{bits}", in_features=k, out_features=n, bits=bits, group_size=group,
                           ggml_type=type_name)
    kernel = CpuInt4Kernel() if bits == 4 else CpuW8A8Kernel()
    processed = kernel.process_weights(dict(weights), spec)
    assert "a8panels" in processed
    half = lib.has_f16c and type_name in _FP16_SCALES
    assert processed["spanels"].dtype == (torch.float16 if half else torch.float32)
    x = torch.randn(300, k) * 2
    x[3, :64] = 0.0  # all-zero blocks
    bias = torch.randn(n)
    full = kernel.apply(x, processed, bias, spec)
    want, xq, d = _act8_emulated(x, weights, bits, group, bias)
    torch.testing.assert_close(full.double(), want, rtol=1e-5, atol=1e-4)
    got_q, got_d, got_s = lib.quantize_rows_q8_32(x)
    assert torch.equal(got_q, xq) and torch.equal(got_d, d)
    assert torch.equal(got_s, got_d * got_q.reshape(300, -1, 32).sum(-1).float())
    for m in (1, 7, 64):
        assert torch.equal(kernel.apply(x[:m], processed, bias, spec), full[:m]), m
    assert torch.equal(kernel.apply(x[299:], processed, bias, spec), full[299:])
    xb = x[:7].to(torch.bfloat16)
    assert torch.equal(kernel.apply(xb, processed, bias.to(torch.bfloat16), spec),
                       kernel.apply(xb.float(), processed, bias.to(torch.bfloat16).float(), spec).to(torch.bfloat16))
    ref = reference_linear(x, weights, bias, spec)
    assert float((full - ref).norm() / ref.norm()) < 1e-2  # int8 rounding of the activations, ~0.3 % here


def test_int8_activations_are_a_per_layer_choice(monkeypatch):
    """GGUF layers keep float activations unless LLMCTL_CPU_GGUF_INT8_ACT=1, and layers without a GGUF block type
    keep them even then; the quantizer is correct on extreme blocks (+-127 reached, no overflow of the int16 pair
    sums with 15 x 127 everywhere)."""
    from llmctl_cpu.quant import INT8_ACT_ENV

    lib = quant_kernels()
    if not lib.has_avx2:
        pytest.skip("the int8-activation GEMM is the AVX2 build's")
    n, k = 20, 64
    weights = {"qweight": torch.full((n, k // 2), 0xFF, dtype=torch.uint8), "scales": torch.ones(n, 2),
               "mins": torch.zeros(n, 2)}
    gguf = QuantLinearSpec(format="int4", in_features=k, out_features=n, bits=4, group_size=32, ggml_type="Q4_0")
    plain = QuantLinearSpec(format="int4", in_features=k, out_features=n, bits=4, group_size=32)
    monkeypatch.delenv(INT8_ACT_ENV, raising=False)
    assert "qpanels" in CpuInt4Kernel().process_weights(dict(weights), gguf)  # off by default
    monkeypatch.setenv(INT8_ACT_ENV, "1")
    assert "qpanels" in CpuInt4Kernel().process_weights(dict(weights), plain)
    processed = CpuInt4Kernel().process_weights(dict(weights), gguf)
    assert "a8panels" in processed
    x = torch.where(torch.rand(3, k) < 0.5, -1.0, 1.0)  # every element quantizes to +-127
    x[1] = 1.0
    got = CpuInt4Kernel().apply(x, processed, None, gguf)
    torch.testing.assert_close(got, (15 * x.sum(-1, keepdim=True)).expand(3, n), rtol=1e-6, atol=1e-5)
    monkeypatch.setenv(INT8_ACT_ENV, "0")
    assert "qpanels" in CpuInt4Kernel().process_weights(dict(weights), gguf)


def test_w8a8_extreme_values_stay_exact():
    """-128 weights against +-127 activations: the AVX2 path's u8 x s8 pairs must not saturate."""
    lib = quant_kernels()
    if not lib.has_w8a8:
        pytest.skip("neither AVX512-VNNI nor AVX2 in this build")
    n, k = 19, 67
    q = torch.full((n, k), -128, dtype=torch.int8)
    q[::2, 1::3] = 127
    weights = {"qweight": q, "scales": torch.rand(n, 1) * 0.02}
    spec = QuantLinearSpec(format="int8", in_features=k, out_features=n, bits=8, group_size=k, act="int8")
    x = torch.where(torch.rand(5, k) < 0.5, -1.0, 1.0)  # every element quantizes to +-127
    got = _run(CpuW8A8Kernel(), weights, spec, x, None)
    torch.testing.assert_close(got, reference_linear(x, weights, None, spec), rtol=0, atol=0)


_QUANT_BUILD_NEEDS = {"x86-64": (), "x86-64-v3": ("avx2", "fma"), "skylake-avx512": ("avx512f", "avx512bw", "avx512vl"),
                      "cascadelake": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
                      "cooperlake": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")}


def _quant_build(target, tmp_path, run):
    """quant.c compiled for ``-march=target`` (warning-free), loaded when ``run`` and this CPU can execute it."""
    import ctypes
    import platform
    import subprocess

    from llmctl_cpu import native
    from llmctl_cpu.platform import cpu_info
    from llmctl_cpu.quant import QUANT_SOURCE, QuantKernels

    cc = native._compiler()
    if cc is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs a C compiler targeting x86-64")
    flags = [f"-march={target}" if f == "-march=native" else f for f in native.CFLAGS]
    so = tmp_path / f"quant-{target}.so"
    proc = subprocess.run([cc, *flags, "-Wall", "-o", str(so), str(QUANT_SOURCE), "-lm"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr[-2000:]
    if not run:
        return None
    if not all(flag in cpu_info().flags for flag in _QUANT_BUILD_NEEDS[target]):
        pytest.skip(f"this host cannot run a {target} build")
    return QuantKernels(ctypes.CDLL(str(so)))


@pytest.mark.parametrize("target", ["cooperlake", "sapphirerapids"])
def test_quant_kernels_compile_for_avx512_bf16_and_amx_hosts(tmp_path, target):
    """The AVX512-BF16 and AMX-INT8 paths build warning-free (the runnable builds below cover the others)."""
    _quant_build(target, tmp_path, run=False)


@pytest.mark.parametrize("target", ["x86-64", "x86-64-v3", "skylake-avx512", "cascadelake"])
def test_quant_kernels_of_other_builds_equal_reference(tmp_path, target):
    """The scalar, AVX2 and AVX-512 (with and without VNNI) builds, each run where this CPU can: the panels of every
    build with AVX2 (AVX-512 ones included: their GGUF layers run there), the streamed layout of every build."""
    lib = _quant_build(target, tmp_path, run=True)
    assert lib.has_avx2 == (target != "x86-64")
    assert lib.has_avx512 == (target in ("skylake-avx512", "cascadelake"))
    n, k = 37, 256
    for bits, group, asym in ((4, 32, True), (8, 16, True), (8, 256, False)):
        weights = _groupwise(n, k, group, bits, asym, seed=bits + group)
        spec = QuantLinearSpec(format=f"int{bits}", in_features=k, out_features=n, bits=bits, group_size=group)
        bias = torch.randn(n)
        for m in (1, 7, 64):
            x = torch.randn(m, k)
            expect = reference_linear(x, weights, bias, spec)
            if lib.has_avx2:
                panels = lib.pack_wq_panels(weights["qweight"], bits, weights["scales"], weights.get("mins"), group)
                got = lib.gemm_wq_panels(x, panels, bits, group, bias, n)
                torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
            got = lib.gemm_wq(x, weights["qweight"], bits, weights["scales"].float().contiguous(),
                              weights.get("mins"), group, bias, n)
            torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
            if group % 32 == 0:  # the int8-activation GEMM (AVX2 builds) and its quantizer (every build)
                want, xq, d = _act8_emulated(x, weights, bits, group, bias)
                got_q, got_d, _ = lib.quantize_rows_q8_32(x)
                assert torch.equal(got_q, xq) and torch.equal(got_d, d)
                if lib.has_avx2:
                    panels = lib.pack_wq_act8(weights["qweight"], bits, weights["scales"], weights.get("mins"), group)
                    got = lib.gemm_wq_panels(x, panels, bits, group, bias, n)
                    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    q = torch.randint(-128, 128, (n, 203), dtype=torch.int8)
    scales = torch.rand(n) * 0.02
    spec = QuantLinearSpec(format="int8", in_features=203, out_features=n, bits=8, group_size=203, act="int8")
    x = torch.randn(7, 203) * 3
    want = reference_linear(x, {"qweight": q, "scales": scales.reshape(n, 1)}, None, spec)
    panels, colsum = lib.pack_int8(q)
    torch.testing.assert_close(lib.gemm_w8a8(x, panels, colsum, scales, None, n), want, rtol=0, atol=0)


def test_avx512_panels_give_the_avx2_panels_bits(tmp_path):
    """Decode-sized calls (up to 4 rows) take one 16-lane vector per panel on AVX-512 builds, where AVX2 builds
    take two 8-lane halves: each lane's operations are the same, in the same order, so the results are equal."""
    avx2 = _quant_build("x86-64-v3", tmp_path, run=True)
    avx512 = _quant_build("skylake-avx512", tmp_path, run=True)
    n, k = 37, 256
    for bits, group, asym in ((4, 32, True), (4, 64, False), (8, 32, True)):
        weights = _groupwise(n, k, group, bits, asym, seed=3 * bits + group)
        bias = torch.randn(n)
        for m in (1, 2, 3, 4):
            x = torch.randn(m, k)
            got = [lib.gemm_wq_panels(x, lib.pack_wq_panels(weights["qweight"], bits, weights["scales"],
                                                            weights.get("mins"), group), bits, group, b, n)
                   for lib in (avx2, avx512) for b in (bias, None)]
            assert torch.equal(got[0], got[2]) and torch.equal(got[1], got[3]), (bits, group, m)
