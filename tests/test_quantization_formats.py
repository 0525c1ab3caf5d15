"""Each packed format unpacks to exactly the values its own library (or published layout) stores, and core's
reference matmul equals the dequantized weight's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llmctl.plugins.types import QuantLinearSpec
from llmctl.quantization.gguf import convert_blocks, dequantize_blocks
from llmctl.quantization.packing import (
    awq_pack,
    awq_unpack,
    dequant_int4,
    dequant_int8,
    pack_int32,
    pack_nibbles,
    unpack_int32,
    unpack_nibbles,
)
from llmctl.quantization.reference import ReferenceQuantKernel, quantize_int8_per_token, reference_linear

SIMPLE_GGUF = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def gguf_blocks(type_name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Blocks of ``type_name`` for a random [n, k] weight: gguf's own quantizer where it has one; otherwise
    random bytes with the block's float16 scales set to small finite values (gguf-py cannot quantize K-quants)."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in SIMPLE_GGUF:
        return quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    per, size = gguf.constants.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // per, size), dtype=np.uint8)
    # float16 super-block scales: d (and dmin) at these byte offsets of each block
    fp16_at = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[type_name]
    vals = rng.uniform(1e-4, 1e-3, size=(n, k // per, len(fp16_at))).astype(np.float16)
    for i, at in enumerate(fp16_at):
        raw[..., at:at + 2] = vals[..., i:i + 1].view(np.uint8)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("type_name", SIMPLE_GGUF)
def test_gguf_blocks_unpack_exactly(type_name):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    n, k = 24, 96
    raw = gguf_blocks(type_name, n, k)
    fmt, w, group = convert_blocks(torch.from_numpy(raw), type_name, k)
    assert group == 32
    ours = dequant_int4(w["qweight"], w["scales"], w["mins"]) if fmt == "int4" else dequant_int8(
        w["qweight"], w["scales"], w.get("mins"))
    theirs = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).copy())
    assert fmt == ("int4" if type_name in ("Q4_0", "Q4_1") else "int8")
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_gguf_k_quants_unpack_exactly_into_groups(type_name):
    """Q4_K -> int4 and Q5_K -> int8 in groups of 32 (scale d * sc, min -dmin * m), Q6_K -> int8 in groups of
    16: the same floats as the gguf package's dequantizer, bit for bit."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = gguf_blocks(type_name, 8, 512)
    fmt, w, group = convert_blocks(torch.from_numpy(raw), type_name, 512)
    assert (fmt, group) == {"Q4_K": ("int4", 32), "Q5_K": ("int8", 32), "Q6_K": ("int8", 16)}[type_name]
    ours = dequant_int4(w["qweight"], w["scales"], w["mins"]) if fmt == "int4" else dequant_int8(
        w["qweight"], w["scales"], w.get("mins"))
    assert torch.equal(ours, torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).copy()))


@pytest.mark.parametrize("type_name", sorted(set(K_QUANTS) - {"Q4_K", "Q5_K", "Q6_K"}))
def test_gguf_k_quants_stay_blocks_and_dequantize_by_gguf(type_name):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = gguf_blocks(type_name, 8, 256)
    fmt, w, _ = convert_blocks(torch.from_numpy(raw), type_name, 256)
    assert fmt == "gguf" and torch.equal(w["qweight"], torch.from_numpy(raw))
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).copy())
    assert torch.isfinite(ref).all()
    assert torch.equal(dequantize_blocks(w["qweight"], type_name, 256), ref)


def test_nibbles_round_trip():
    q = torch.randint(0, 16, (5, 34), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (5, 17)
    assert torch.equal(unpack_nibbles(packed), q)
    assert int(packed[0, 0]) == int(q[0, 0]) | int(q[0, 1]) << 4


@pytest.mark.parametrize("bits", [4, 8])
def test_int32_packing_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    signed = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (16, 64), dtype=torch.int8)
    theirs = pack_to_int32(signed, bits)  # packs the values offset to unsigned, along dim 1
    ours = unpack_int32(theirs, bits, dim=1)
    assert torch.equal(ours - (1 << (bits - 1)), signed.to(torch.int32))
    assert torch.equal(pack_int32(ours, bits, dim=1), theirs)
    zp_theirs = pack_to_int32(signed, bits, packed_dim=0)  # zero points pack along N
    assert torch.equal(unpack_int32(zp_theirs, bits, dim=0) - (1 << (bits - 1)), signed.to(torch.int32))
    assert torch.equal(unpack_from_int32(theirs, bits, signed.shape), signed)


def test_gptq_layout_bit_positions():
    """GPTQ packs eight 4-bit values per int32 along K, value i at bits 4i..4i+3 (AutoGPTQ's pack loop)."""
    q = torch.randint(0, 16, (16, 3), dtype=torch.int32)  # [K, N]
    words = torch.zeros(2, 3, dtype=torch.int64)
    for row in range(2):
        for j in range(8):
            words[row] |= q[row * 8 + j].to(torch.int64) << (4 * j)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    assert torch.equal(unpack_int32(words, 4, dim=0), q)


def test_awq_order():
    """AWQ's GEMM layout: output column order[i] of each group of eight sits at bits 4i (AutoAWQ's AWQ_ORDER)."""
    q = torch.randint(0, 16, (4, 16), dtype=torch.int32)
    packed = awq_pack(q)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    word = int(packed[1, 1]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [int(q[1, 8 + order[i]]) for i in range(8)]
    assert torch.equal(awq_unpack(packed), q)


def _spec(fmt: str, k: int, n: int, bits: int, group: int, act: str | None = None) -> QuantLinearSpec:
    return QuantLinearSpec(format=fmt, in_features=k, out_features=n, bits=bits, group_size=group, act=act)


def test_reference_int8_w8a8_is_exact_integer_arithmetic():
    torch.manual_seed(0)
    x = torch.randn(7, 96)
    q = torch.randint(-127, 128, (40, 96), dtype=torch.int8)
    s = torch.rand(40, 1) * 0.01
    out = reference_linear(x, {"qweight": q, "scales": s}, None, _spec("int8", 96, 40, 8, 96, "int8"))
    xq, xs = quantize_int8_per_token(x)
    expect = (xq.double() @ q.double().t()) * xs.double() * s.double().t()
    torch.testing.assert_close(out.double(), expect, rtol=1e-6, atol=1e-6)


def test_reference_kernel_equals_dequantized_matmul_with_act_order():
    torch.manual_seed(0)
    n, k, g = 24, 64, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales, mins = torch.rand(n, k // g), torch.randn(n, k // g)
    perm = torch.randperm(k)
    weights = {"qweight": pack_nibbles(q), "scales": scales, "mins": mins, "perm": perm}
    spec = _spec("int4", k, n, 4, g)
    x = torch.randn(5, k)
    w = q.float().view(n, 2, g) * scales[..., None] + mins[..., None]
    # the layer holds K permuted: column j of the stored weight multiplies input column perm[j]
    expect = x[:, perm] @ w.view(n, k).t()
    torch.testing.assert_close(ReferenceQuantKernel("int4").apply(x, weights, None, spec), expect)
    torch.testing.assert_close(reference_linear(x, weights, None, spec), expect)
