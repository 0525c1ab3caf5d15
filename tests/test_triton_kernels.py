"""The llmctl-triton kernels against core's torch reference, run in Triton's CPU interpreter.

Inputs are drawn fresh each run from a time-based seed (``LLMCTL_TEST_SEED`` pins it); every failure message
names the seed so a failing draw can be replayed. Outputs are poisoned with NaN first, so an element a kernel
forgets to write fails the comparison.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / llmctl_triton

import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from llmctl.attention import AttentionMetadata  # noqa: E402
from llmctl.ops import reference  # noqa: E402
from llmctl.ops.paged_attention import paged_attention_reference, write_kv_reference  # noqa: E402

from tests.gpu.paged_batch import make_batch as _make_batch  # noqa: E402
from tests.gpu.paged_batch import ragged as _ragged  # noqa: E402

llmctl_triton = pytest.importorskip("llmctl_triton", reason="install llmctl-triton: pip install -e ./triton_kernels")
from llmctl_triton import (  # noqa: E402
    TritonAttentionBackend,
    fused_add_rms_norm,
    paged_attention,
    rms_norm,
    rotary_embedding,
    silu_and_mul,
    use_split_k,
    write_kv,
)

SEED = int(os.environ.get("LLMCTL_TEST_SEED", time.time_ns() % 2**31))
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2.5e-2, 2.5e-2)}


def _gen(salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + salt)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOL[dtype]
    assert not torch.isnan(actual).any(), f"{what}: NaN left in the output (element not written); seed={SEED}"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}\nreplay with LLMCTL_TEST_SEED={SEED}")


# (dtype, head_size, num_kv_heads, gqa ratio, block_size, sliding window)
ATTN_CASES = [
    (torch.float32, 64, 2, 4, 16, None),
    (torch.float16, 128, 1, 8, 32, None),
    (torch.bfloat16, 80, 2, 1, 16, None),
    (torch.float16, 96, 1, 4, 32, 24),
    (torch.bfloat16, 64, 2, 8, 16, 20),
    (torch.float32, 128, 2, 1, 32, 40),
]


@pytest.mark.parametrize("dtype,head,num_kv,group,block_size,window", ATTN_CASES)
def test_paged_attention_mixed_batch(dtype, head, num_kv, group, block_size, window):
    gen = _gen(1 + head + 7 * group + block_size)
    # Decodes, fresh prefills and prefill chunks on top of cached context, in one flattened batch.
    q_lens = [1, 1, *_ragged(gen, 2, 2, 19), 1, *_ragged(gen, 1, 5, 12)]
    ctx_lens = [*_ragged(gen, 2, 1, 70), 0, *_ragged(gen, 1, 3, 50), *_ragged(gen, 1, 20, 90), *_ragged(gen, 1, 1, 40)]
    kv, meta = _make_batch(gen, q_lens, ctx_lens, block_size, num_kv, head, dtype)
    query = _randn(gen, meta.num_tokens, num_kv * group, head, dtype=dtype)
    scale = head ** -0.5
    expected = paged_attention_reference(query, kv, meta, scale, window)
    out = torch.full_like(query, float("nan"))
    got = paged_attention(query, kv, meta, scale, window, out=out, split_k=False)
    assert got.data_ptr() == out.data_ptr()
    _close(got, expected, dtype, f"paged attention q_lens={q_lens} ctx={ctx_lens}")


@pytest.mark.parametrize("dtype,head,num_kv,group,block_size,window", [
    (torch.float16, 64, 2, 4, 16, None),
    (torch.bfloat16, 128, 1, 8, 32, None),
    (torch.float32, 96, 2, 1, 16, 50),
])
def test_split_k_decode(dtype, head, num_kv, group, block_size, window):
    gen = _gen(100 + head + group)
    q_lens = [1] * 4
    ctx_lens = [*_ragged(gen, 3, 40, 160), 2]  # one short context: only its first partition holds keys
    kv, meta = _make_batch(gen, q_lens, ctx_lens, block_size, num_kv, head, dtype)
    query = _randn(gen, meta.num_tokens, num_kv * group, head, dtype=dtype)
    scale = head ** -0.5
    expected = paged_attention_reference(query, kv, meta, scale, window)
    out = torch.full_like(query, float("nan"))
    got = paged_attention(query, kv, meta, scale, window, out=out, split_k=True, partition_size=32)
    _close(got, expected, dtype, f"split-K decode ctx={ctx_lens}")
    single = paged_attention(query, kv, meta, scale, window, split_k=False)
    _close(got, single, dtype, "split-K vs single-pass kernel")


def test_split_k_heuristic_and_guard():
    gen = _gen(200)
    kv, decode = _make_batch(gen, [1, 1], [300, 100], 16, 2, 64, torch.float32)
    assert use_split_k(decode, num_kv_heads=2, device=torch.device("cpu"), partition_size=64)
    assert not use_split_k(decode, num_kv_heads=2, device=torch.device("cpu"), partition_size=512)
    _, prefill = _make_batch(gen, [1, 5], [300, 100], 16, 2, 64, torch.float32)
    assert not use_split_k(prefill, num_kv_heads=2, device=torch.device("cpu"), partition_size=64)
    query = _randn(gen, prefill.num_tokens, 2, 64)
    with pytest.raises(ValueError, match="decode-only"):
        paged_attention(query, kv, prefill, 0.125, split_k=True)


@pytest.mark.parametrize("split_k", [False, True])
def test_captured_decode_shape(split_k):
    """The batch a captured decode graph replays: live decodes padded with empty sequences (seq_len 0, slot -1)
    and ``max_seq_len`` held at its worst case. Live rows must match the reference, padded rows must be zeros
    (finite: split-K's merge of partitions that saw no key at all must not divide 0 by 0)."""
    gen = _gen(250)
    dtype, head, num_kv, group, block_size, pad = torch.float16, 64, 2, 2, 16, 3
    kv, live = _make_batch(gen, [1] * 3, _ragged(gen, 3, 5, 90), block_size, num_kv, head, dtype)
    n = live.num_seqs
    batch = n + pad
    width = 8
    tables = torch.zeros(batch, width, dtype=torch.int32)
    tables[:n, : live.block_tables.shape[1]] = live.block_tables
    meta = AttentionMetadata(
        num_tokens=batch, num_seqs=batch, query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens=torch.cat([live.seq_lens, torch.zeros(pad, dtype=torch.int32)]), block_tables=tables,
        slot_mapping=torch.cat([live.slot_mapping, torch.full((pad,), -1, dtype=torch.int64)]),
        max_query_len=1, max_seq_len=width * block_size, block_size=block_size)
    query = _randn(gen, batch, num_kv * group, head, dtype=dtype)
    expected = paged_attention_reference(query[:n], kv, live, head ** -0.5)
    out = torch.full_like(query, float("nan"))
    got = paged_attention(query, kv, meta, head ** -0.5, out=out, split_k=split_k, partition_size=32)
    _close(got[:n], expected, dtype, f"captured decode shape, split_k={split_k}")
    assert torch.equal(got[n:], torch.zeros_like(got[n:])), f"padded rows must be zeros; seed={SEED}"


def test_attention_is_batch_invariant():
    """A sequence gets the same output alone as inside a batch (the contract of AttentionBackend.forward)."""
    gen = _gen(300)
    dtype = torch.float16
    kv, meta = _make_batch(gen, [3, 1, 9], [17, 40, 0], 16, 2, 64, dtype)
    query = _randn(gen, meta.num_tokens, 4, 64, dtype=dtype)
    full = paged_attention(query, kv, meta, 0.125)
    alone = AttentionMetadata(
        num_tokens=1, num_seqs=1, query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        seq_lens=meta.seq_lens[1:2].clone(), block_tables=meta.block_tables[1:2].clone(),
        slot_mapping=meta.slot_mapping[3:4].clone(), max_query_len=1, max_seq_len=41, block_size=16)
    single = paged_attention(query[3:4].clone(), kv, alone, 0.125)
    torch.testing.assert_close(single, full[3:4], atol=1e-3, rtol=1e-3, msg=lambda m: f"{m}; seed={SEED}")


@pytest.mark.parametrize("dtype,block_size", [(torch.float16, 16), (torch.bfloat16, 32), (torch.float32, 16)])
def test_write_kv(dtype, block_size):
    gen = _gen(400 + block_size)
    kv, meta = _make_batch(gen, [1, 7, 3], [5, 0, 30], block_size, 2, 80, dtype)
    key = _randn(gen, meta.num_tokens, 2, 80, dtype=dtype)
    value = _randn(gen, meta.num_tokens, 2, 80, dtype=dtype)
    slots = meta.slot_mapping.clone()
    slots[torch.randperm(len(slots), generator=gen)[:3]] = -1  # skipped tokens
    expected = kv.clone()
    write_kv_reference(key, value, expected, slots)
    got = kv.clone()
    write_kv(key, value, got, slots)
    assert torch.equal(got, expected), f"write_kv differs from the reference; seed={SEED}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm_and_fused_add(dtype, hidden):
    gen = _gen(500 + hidden)
    x = _randn(gen, 2, 5, hidden, dtype=dtype) * 3
    res = _randn(gen, 2, 5, hidden, dtype=dtype)
    w = _randn(gen, hidden, dtype=dtype)
    _close(rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), dtype, "rms_norm")
    x_before, res_before = x.clone(), res.clone()
    normed, new_res = fused_add_rms_norm(x, res, w, 1e-5)
    exp_normed, exp_res = reference.fused_add_rms_norm(x, res, w, 1e-5)
    _close(new_res, exp_res, dtype, "fused_add_rms_norm residual")
    _close(normed, exp_normed, dtype, "fused_add_rms_norm output")
    assert torch.equal(x, x_before) and torch.equal(res, res_before), "inputs must not be modified"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("head,rot", [(64, 64), (128, 32)])
def test_rotary_embedding(dtype, neox, head, rot):
    gen = _gen(600 + head + rot + int(neox))
    tokens, max_pos = 7, 64
    positions = torch.randint(0, max_pos, (tokens,), generator=gen)
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.arange(max_pos).float()[:, None] * inv[None, :]
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    q = _randn(gen, tokens, 4, head, dtype=dtype)
    k = _randn(gen, tokens, 2, head, dtype=dtype)
    gq, gk = rotary_embedding(positions, q, k, cache, neox)
    eq, ek = reference.rotary_embedding(positions, q, k, cache, neox)
    _close(gq, eq, dtype, f"rotary query neox={neox}")
    _close(gk, ek, dtype, f"rotary key neox={neox}")
    if rot < head:
        assert torch.equal(gq[..., rot:], q[..., rot:]), "pass-through features of partial rotary changed"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_silu_and_mul(dtype):
    gen = _gen(700)
    x = _randn(gen, 3, 4, 2 * 100, dtype=dtype) * 2
    _close(silu_and_mul(x), reference.silu_and_mul(x), dtype, "silu_and_mul")


def test_backend_contract():
    """The backend registered by the plugins: supports() answers with reasons, forward() matches the oracle."""
    be = TritonAttentionBackend(platform="cuda")
    assert be.name == "triton" and be.platform == "cuda" and be.priority == 10
    assert be.supports(torch.bfloat16, 128, 16, frozenset({"sliding_window", "prefix_caching"}))
    no = be.supports(torch.int8, 128, 16, frozenset())
    assert not no and "int8" in no.reason
    no = be.supports(torch.float16, 512, 16, frozenset())
    assert not no and "head_size" in no.reason
    no = be.supports(torch.float16, 64, 16, frozenset({"alibi"}))
    assert not no and "alibi" in no.reason
    gen = _gen(800)
    kv, meta = _make_batch(gen, [4, 1], [0, 20], 16, 2, 64, torch.float32)
    key = _randn(gen, meta.num_tokens, 2, 64)
    value = _randn(gen, meta.num_tokens, 2, 64)
    ref_kv = kv.clone()
    write_kv_reference(key, value, ref_kv, meta.slot_mapping)
    be.write_kv(key, value, kv, meta.slot_mapping)
    assert torch.equal(kv, ref_kv)
    query = _randn(gen, meta.num_tokens + 2, 8, 64)  # two padding rows past num_tokens
    out = torch.full_like(query, float("nan"))
    be.forward(query, kv, meta, 0.125, None, out)
    _close(out, paged_attention_reference(query, kv, meta, 0.125), torch.float32, "backend forward")


def test_registered_op_overrides_run_the_kernels():
    """What core gets from the registry for platform "cuda" is the Triton code, and it computes the same thing."""
    from llmctl.plugins.registry import Registry
    from llmctl_triton.backend import op_overrides

    reg = Registry()
    for op in op_overrides("cuda"):
        reg.add_op(op, plugin="cuda")
    ops = reg.resolve_ops("cuda")
    gen = _gen(900)
    x = _randn(gen, 3, 2 * 48, dtype=torch.float16)
    _close(ops.silu_and_mul(x), reference.silu_and_mul(x), torch.float16, "registered silu_and_mul")
    w = _randn(gen, 2 * 48, dtype=torch.float16)
    _close(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), torch.float16, "registered rms_norm")


def test_cpu_tensors_without_interpreter_fail_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need GPU tensors"):
        silu_and_mul(torch.randn(2, 8))


# -- fused_moe -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_moe_testkit_clause(dtype):
    """The testkit's fused_moe clause (random routing, an expert nobody picks, hidden not a multiple of 16, 300
    tokens) on the Triton kernel, which takes the plain weights (the reference's pack declines)."""
    from llmctl_testkit.checks import check_fused_moe
    from llmctl_triton.moe import fused_moe

    check_fused_moe(reference.pack_fused_moe_weights, fused_moe, torch.device("cpu"), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_moe_exact_where_the_reference_is_exact(dtype):
    from llmctl_triton.moe import fused_moe

    from tests.moe_cases import EXACT_SHAPES, integer_case

    gen = _gen(1000)
    for shape in EXACT_SHAPES:
        args = integer_case(*shape, dtype, gen)
        expected = reference.fused_moe(*args)
        got = fused_moe(*args)
        assert torch.equal(got, expected), f"{shape}: max diff {(got.float() - expected.float()).abs().max()}"


def test_fused_moe_alignment_puts_each_pair_once_in_blocks_of_one_expert():
    from llmctl_triton.moe import align_by_expert

    gen = _gen(1100)
    experts, block_m = 6, 16
    ids = torch.randint(0, experts - 1, (45, 2), generator=gen)  # the last expert gets no row
    sorted_ids, block_expert = align_by_expert(ids, experts, block_m)
    flat = ids.reshape(-1)
    real = sorted_ids[sorted_ids < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_ids[b * block_m:(b + 1) * block_m]
        rows = rows[rows < flat.numel()]
        if e < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and bool((flat[rows] == e).all())
            assert rows.tolist() == sorted(rows.tolist())  # an expert's rows in token order
    with pytest.raises(IndexError, match="expert >= the layer's 6 experts"):
        align_by_expert(torch.tensor([[0, 6]]), experts, block_m)


def test_fused_moe_is_registered_for_the_gpu_platforms():
    from llmctl.plugins.registry import Registry
    from llmctl_triton.backend import op_overrides
    from llmctl_triton.ops import fused_moe

    for platform in ("cuda", "rocm"):
        reg = Registry()
        for op in op_overrides(platform):
            reg.add_op(op, plugin=platform)
        assert reg.resolve_ops(platform).fused_moe is fused_moe


# -- quantized linear layers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_only_gemm_testkit_clause(dtype):
    """The testkit's quantization clause (int4 with groups and mins, int8 per channel weight-only and W8A8; 1 and
    7 rows, a bias) on the Triton GEMMs; int8 activations on int4 weights it declines, saying why."""
    from llmctl.plugins.types import QuantLinearSpec
    from llmctl_testkit.checks import check_quant_method
    from llmctl_triton.quant import TritonIntKernel

    assert check_quant_method(TritonIntKernel("int4", "cuda"), torch.device("cpu"), dtype) == 1
    assert check_quant_method(TritonIntKernel("int8", "cuda"), torch.device("cpu"), dtype) == 2  # W8A16 and W8A8
    odd = TritonIntKernel("int4", "cuda").supports(QuantLinearSpec("int4", 64, 32, 4, 32, act="int8"), dtype)
    assert not odd and "int8 activations on int4 weights" in odd.reason


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_weight_only_gemm_act_order_groups_odd_shapes(fmt):
    """GPTQ act-order (``perm``), int8 groups with mins, N and M that are not multiples of the tiles, against
    core's reference at 1, 7, 64 and 300 rows."""
    from llmctl.plugins.types import QuantLinearSpec
    from llmctl.quantization.reference import reference_linear
    from llmctl_triton.quant import TritonIntKernel

    gen = _gen(1200)
    n, k, group = 50, 96, 32
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 0.005
    if fmt == "int4":
        q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.int64).to(torch.uint8)
    else:
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int64).to(torch.int8)
    weights = {"qweight": q, "scales": scales, "mins": -3 * scales, "perm": torch.randperm(k, generator=gen)}
    spec = QuantLinearSpec(fmt, k, n, 4 if fmt == "int4" else 8, group)
    method = TritonIntKernel(fmt, "cuda")
    assert method.supports(spec, torch.float32)
    for rows in (1, 7, 64, 300):
        x = torch.randn(rows, k, generator=gen)
        bias = torch.randn(n, generator=gen)
        got = method.apply(x, weights, bias, spec)
        want = reference_linear(x, weights, bias, spec)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{fmt} {rows} rows (seed {SEED})")


def test_w8a8_gemm_odd_shapes():
    """int8 W8A8: the same per-token activation codes as the reference and exact int32 sums, so the float32
    epilogue's result equals the reference's up to the order of two scale multiplications."""
    from llmctl.plugins.types import QuantLinearSpec
    from llmctl.quantization.reference import reference_linear
    from llmctl_triton.quant import TritonIntKernel

    gen = _gen(1300)
    n, k = 50, 160
    weights = {"qweight": torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int64).to(torch.int8),
               "scales": torch.rand(n, 1, generator=gen) * 0.01 + 0.001}
    spec = QuantLinearSpec("int8", k, n, 8, k, act="int8")
    method = TritonIntKernel("int8", "cuda")
    assert method.supports(spec, torch.float32)
    for rows in (1, 7, 64, 300):
        x = torch.randn(rows, k, generator=gen)
        bias = torch.randn(n, generator=gen)
        torch.testing.assert_close(method.apply(x, weights, bias, spec), reference_linear(x, weights, bias, spec),
                                   rtol=1e-6, atol=1e-6, msg=f"{rows} rows (seed {SEED})")


def test_quant_kernels_are_registered_for_the_gpu_platforms():
    """Each GPU plugin's quantization hook registers the Triton GEMMs and the FP8 kernel for its own platform;
    without FP8 matrix units (or without a GPU, as here) the FP8 kernel declines and says why."""
    import llmctl_cuda
    import llmctl_rocm
    from llmctl.plugins.registry import Registry
    from llmctl.plugins.types import QuantLinearSpec

    for platform, module in (("cuda", llmctl_cuda), ("rocm", llmctl_rocm)):
        reg = Registry()
        module.llmctl_register_quantization(lambda m, reg=reg, platform=platform: reg.add_quant_method(m, platform))
        kernels = {key: entry.item.kernel for key, entry in reg.quant_methods.items()}
        assert set(kernels) == {f"int4@{platform}", f"int8@{platform}", f"fp8@{platform}"}, kernels
        fp8 = reg.quant_methods[f"fp8@{platform}"].item
        answer = fp8.supports(QuantLinearSpec("fp8", 64, 32, 8, 64, act="fp8"), torch.bfloat16)
        if not torch.cuda.is_available():
            assert not answer and answer.reason == "no GPU visible to torch"
