"""8-bit KV cache kernels against the torch reference (``llmctl.ops.paged_attention`` reading an 8-bit cache): the
CPU plugin's C write and attention (AVX-512 where the host has it, and the generic build), on odd shapes."""

from __future__ import annotations

import random

import pytest
import torch
from llmctl import SamplingParams
from llmctl.kv.cache_dtype import SCALE_BYTES, dequantize_rows, pack_rows
from llmctl.ops.paged_attention import paged_attention_reference, write_kv_reference

from tests import native_builds
from tests.test_cpu_plugin import make_batch, random_specs

KV8 = [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2]
IDS = ["int8", "fp8_e4m3", "fp8_e5m2"]
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2)}


@pytest.fixture(scope="module")
def lib():
    from llmctl_cpu import native

    ok, why = native.status()
    if not ok:
        pytest.skip(f"CPU C kernels not available: {why}")
    return native.kernels()


@pytest.fixture(scope="module")
def backend():
    from llmctl.plugins import get_plugin_manager

    return get_plugin_manager().registry.attention_backends["cpu-sdpa"].item


@pytest.fixture
def rng(request):
    return random.Random(hash(request.node.nodeid) & 0xFFFF)


def quantized_batch(rng, specs, block_size, kv_heads, heads, head_size, dtype, kv_dtype):
    """make_batch's step over an 8-bit cache: every slot (stale ones included) holds packed random rows."""
    query, cache, md = make_batch(rng, specs, block_size, kv_heads, heads, head_size, dtype)
    return query, pack_rows(cache.float(), kv_dtype), md


def _special_rows(n: int, kv_heads: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows that exercise rounding: random scales over six decades, an all-zero head, ties, fp8 subnormals."""
    x = torch.randn(n, kv_heads, d) * torch.logspace(-4, 2, n)[:, None, None]
    x[0, 0] = 0.0
    x[1, 0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5, 127.0])
    x[2, 0] = torch.linspace(-1.0, 1.0, d) * 1e-3
    return x.to(dtype)


@pytest.mark.parametrize("kv_dtype", KV8, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size", [16, 64, 80, 128])
def test_c_write_gives_the_reference_bytes(lib, kv_dtype, dtype, head_size):
    kv_heads, block_size, blocks, n = 3, 16, 6, 40
    key, value = _special_rows(n, kv_heads, head_size, dtype), _special_rows(n, kv_heads, head_size, dtype).flip(0)
    slots = torch.randperm(blocks * block_size)[:n]
    slots[5] = -1
    want = torch.zeros(2, blocks, block_size, kv_heads, head_size + SCALE_BYTES, dtype=kv_dtype)
    got = torch.zeros_like(want)
    write_kv_reference(key, value, want, slots)
    lib.write_kv8(key, value, got, slots)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    bad = slots.clone()
    bad[7] = blocks * block_size
    with pytest.raises(IndexError, match=r"slot_mapping\[7\]"):
        lib.write_kv8(key, value, got, bad)


@pytest.mark.parametrize("kv_dtype", KV8, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("group,head_size", [(1, 64), (2, 128), (4, 64), (3, 80), (5, 16)])
def test_backend_on_an_8bit_cache_equals_the_reference(lib, backend, rng, kv_dtype, dtype, block_size, group,
                                                       head_size):
    """Mixed batches (decodes, whole prefills, later chunks) with GQA, sliding windows, head sizes on the vector path
    (64, 128) and off it (16, 80), block sizes down to 1."""
    kv_heads = rng.choice([1, 2, 3])
    window = rng.choice([None, None, rng.randint(1, 64)])
    specs = random_specs(rng, rng.randint(1, 7))
    query, cache, md = quantized_batch(rng, specs, block_size, kv_heads, kv_heads * group, head_size, dtype, kv_dtype)
    scale = head_size ** -0.5
    expect = paged_attention_reference(query, cache, md, scale, window)
    out = torch.full_like(query, float("nan"))
    got = backend.forward(query, cache, md, scale, window, out=out)
    assert got is out and not got.isnan().any()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), expect.float(), atol=atol, rtol=rtol, msg=f"specs={specs} w={window}")


@pytest.mark.parametrize("kv_dtype", KV8, ids=IDS)
def test_backend_write_then_forward_with_new_keys(lib, backend, rng, kv_dtype):
    """Through write_kv (the C quantizing write) and forward, as the attention layer calls them."""
    specs = [(0, 23), (rng.randint(1, 60), 1), (rng.randint(5, 40), rng.randint(2, 20))]
    query, cache, md = quantized_batch(rng, specs, 16, 2, 6, 64, torch.bfloat16, kv_dtype)
    key = torch.randn(md.num_tokens, 2, 64).to(torch.bfloat16)
    value = torch.randn_like(key)
    ref_cache = cache.clone()
    write_kv_reference(key, value, ref_cache, md.slot_mapping)
    backend.write_kv(key, value, cache, md.slot_mapping)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    got = backend.forward(query, cache, md, 0.125, key=key, value=value)
    torch.testing.assert_close(got.float(), paged_attention_reference(query, ref_cache, md, 0.125).float(),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kv_dtype", KV8, ids=IDS)
def test_prefill_rows_equal_decodes_bit_for_bit(lib, backend, kv_dtype):
    """A prefill row is a decode over its prefix in the 8-bit kernel: the prompt's last token gives the same bits
    computed in a prefill as in a decode over the same cache, and a row's bits do not depend on the batch."""
    rng = random.Random(11)
    ctx, q_len = 37, 19
    query, cache, md = quantized_batch(rng, [(ctx, q_len)], 16, 2, 6, 64, torch.bfloat16, kv_dtype)
    whole = backend.forward(query, cache, md, 0.125)
    from llmctl.attention import AttentionMetadata

    table = md.block_tables[:1]
    last = AttentionMetadata(num_tokens=1, num_seqs=1, query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
                             seq_lens=torch.tensor([ctx + q_len], dtype=torch.int32), block_tables=table,
                             slot_mapping=torch.tensor([-1]), max_query_len=1, max_seq_len=ctx + q_len,
                             block_size=16, query_lens_cpu=[1], seq_lens_cpu=[ctx + q_len])
    alone = backend.forward(query[-1:].clone(), cache, last, 0.125)
    assert torch.equal(alone[0], whole[-1])


@pytest.mark.parametrize("target", ["x86-64", "skylake-avx512"])
@pytest.mark.parametrize("kv_dtype", KV8, ids=IDS)
def test_other_builds_write_and_attend_like_the_reference(rng, target, kv_dtype):
    """The generic build (scalar loops and code tables) and a plain AVX-512 build (no bf16 dot products, no AMX),
    compiled here and run on this CPU: same bytes written, same attention as the reference."""
    from llmctl_cpu.platform import cpu_info

    if target == "skylake-avx512" and "avx512bw" not in cpu_info().flags:
        pytest.skip("this host cannot run an AVX-512 build")
    lib = native_builds.runnable(target)
    for dtype, head_size, group in ((torch.float32, 64, 2), (torch.bfloat16, 128, 3), (torch.float32, 80, 1)):
        specs = random_specs(rng, 5)
        query, cache, md = quantized_batch(rng, specs, 16, 2, 2 * group, head_size, dtype, kv_dtype)
        special = cache.clone()  # rounding edge cases: the same bytes as the reference
        want = cache.clone()
        key = _special_rows(md.num_tokens, 2, head_size, dtype)
        write_kv_reference(key, key.flip(0), want, md.slot_mapping)
        lib.write_kv8(key, key.flip(0), special, md.slot_mapping)
        assert torch.equal(special.view(torch.uint8), want.view(torch.uint8)), (target, dtype, head_size)
        # attention over keys of ordinary size (rows scaled by 100 make float32 softmaxes too sharp to compare)
        key, value = torch.randn(md.num_tokens, 2, head_size).to(dtype), torch.randn(md.num_tokens, 2, head_size)
        want = cache.clone()
        write_kv_reference(key, value.to(dtype), want, md.slot_mapping)
        lib.write_kv8(key, value.to(dtype), cache, md.slot_mapping)
        assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8)), (target, dtype, head_size)
        from llmctl_cpu.attention import _NativeRows, _split_batch

        prefills, decodes = _split_batch(md)
        rows = _NativeRows(decodes, prefills, md.block_tables)
        out = torch.full_like(query, float("nan"))
        assert lib.decode_attention_kv8(query, out, cache, rows.block_tables, rows.tables, rows.rows, rows.seq_lens,
                                        None, head_size ** -0.5)
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(out.float(), paged_attention_reference(query, cache, md, head_size ** -0.5).float(),
                                   atol=atol, rtol=rtol, msg=f"{target} {dtype} {head_size} {specs}")


@pytest.mark.parametrize("kv_dtype", KV8, ids=IDS)
def test_kernel_reads_every_code_exactly(lib, kv_dtype):
    """Attention over one key returns its value row: with every code in that row and a scale of 1, the kernel's
    conversion (for e4m3, a half read with the wrong bias and fixed in the scale) must give each code's value."""
    from llmctl.attention import AttentionMetadata
    from llmctl.kv.cache_dtype import row_scales

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    if kv_dtype is not torch.int8:  # NaN and infinity codes are never written (values are clamped first)
        special = (codes & 0x7F) == 0x7F if kv_dtype is torch.float8_e4m3fn else (codes & 0x7C) == 0x7C
        codes[special] = 0
    cache = torch.zeros(2, 1, 1, 1, 256 + SCALE_BYTES, dtype=kv_dtype)
    cache.view(torch.uint8)[:, 0, 0, 0, :256] = codes
    row_scales(cache).fill_(1.0)
    md = AttentionMetadata(num_tokens=1, num_seqs=1, query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
                           seq_lens=torch.tensor([1], dtype=torch.int32),
                           block_tables=torch.zeros(1, 1, dtype=torch.int32), slot_mapping=torch.tensor([-1]),
                           max_query_len=1, max_seq_len=1, block_size=1)
    from llmctl_cpu.attention import _forward_kv8

    query = torch.randn(1, 1, 256)
    out = _forward_kv8(query, cache, md, 0.0625, None, torch.empty_like(query), True)
    want = codes.view(kv_dtype).float()
    assert torch.equal(out[0, 0], want)
    assert torch.equal(dequantize_rows(cache)[1, 0, 0, 0], want)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e5m2"])
def test_recorded_decode_steps_replay_the_8bit_kernels(lib, tiny_model_dirs, kv_cache_dtype):
    """The 8-bit write and attention are in the replay ABI: decode steps over an 8-bit cache are recorded and
    replayed (llmctl_cpu.graph), with the eager run's tokens and logprobs exactly."""
    from llmctl_cpu import graph
    from llmctl_cpu.platform import CpuPlatform

    from tests.test_cpu_graph import _run

    if not (lib.has_gemm_bf16 and torch.bfloat16 in CpuPlatform().supported_dtypes()):
        pytest.skip("no native bf16 kernels on this CPU")
    rng = random.Random(5)
    prompts = [{"prompt_token_ids": [rng.randrange(5, 200) for _ in range(rng.randint(3, 40))]} for _ in range(7)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(5, 30), ignore_eos=True, logprobs=2)
              for _ in prompts]
    _, eager = _run(tiny_model_dirs["llama"], True, prompts, params, max_num_seqs=4, kv_cache_dtype=kv_cache_dtype)
    runner, replayed = _run(tiny_model_dirs["llama"], False, prompts, params, max_num_seqs=4,
                            kv_cache_dtype=kv_cache_dtype)
    assert isinstance(runner, graph.CpuDecodeGraphRunner) and runner.program is not None, runner
    codes = {int(c) for c in runner.program[:, 0].tolist()}
    from llmctl_cpu import native

    assert {native.OP_WRITE_KV8, native.OP_DECODE_ATTENTION_KV8} <= codes
    assert replayed == eager


def test_bf16_gemm_of_zero_rows(lib):
    """A step whose rows are all non-final prefill chunks computes logits for zero rows: the AMX GEMM path
    segfaulted on m = 0 (found running the 8-bit cache's engine tests on a bf16 model)."""
    if not lib.has_gemm_bf16:
        pytest.skip("no bf16 GEMM on this CPU")
    weight = torch.randn(4096, 64).to(torch.bfloat16)
    panels = lib.pack_bf16_panels(weight)
    for amx in (True, False):
        was = lib.amx
        lib.use_amx(amx)
        try:
            y = lib.gemm_bf16(torch.empty(0, 64, dtype=torch.bfloat16), panels, 4096, None)
            assert y.shape == (0, 4096)
            got = lib.gemm_bf16(torch.ones(3, 64, dtype=torch.bfloat16), panels, 4096, None)
            torch.testing.assert_close(got.float(), (torch.ones(3, 64) @ weight.float().T), atol=0.1, rtol=0.02)
        finally:
            lib.use_amx(was)


@pytest.mark.parametrize("kv_dtype", KV8, ids=IDS)
def test_without_c_kernels_the_backend_runs_the_reference(backend, monkeypatch, kv_dtype):
    """No compiler (or LLMCTL_CPU_NATIVE=0), float16 queries, encoders: the 8-bit cache still works, through the
    torch reference."""
    from llmctl_cpu import native

    rng = random.Random(2)
    for dtype, no_native in ((torch.bfloat16, True), (torch.float16, False)):
        with monkeypatch.context() as mp:
            if no_native:
                mp.setattr(native, "kernels", lambda: None)
            specs = [(0, 9), (20, 1), (33, 4)]
            query, cache, md = quantized_batch(rng, specs, 16, 2, 4, 64, dtype, kv_dtype)
            key, value = torch.randn(md.num_tokens, 2, 64).to(dtype), torch.randn(md.num_tokens, 2, 64).to(dtype)
            want = cache.clone()
            write_kv_reference(key, value, want, md.slot_mapping)
            backend.write_kv(key, value, cache, md.slot_mapping)
            assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))
            got = backend.forward(query, cache, md, 0.125)
            assert torch.equal(got, paged_attention_reference(query, want, md, 0.125))
