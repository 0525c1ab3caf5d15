"""The llmctl-triton kernels compiled for a real GPU (CUDA or ROCm), against core's torch reference.

Skipped on hosts without a GPU. Run in its own process so ``TRITON_INTERPRET`` is unset::

    pytest tests/gpu -q
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from llmctl.attention import AttentionMetadata
from llmctl.ops import reference
from llmctl.ops.paged_attention import paged_attention_reference, write_kv_reference

from tests.gpu import REQUIRES_GPU
from tests.gpu.paged_batch import make_batch, ragged

pytestmark = REQUIRES_GPU

SEED = int(os.environ.get("LLMCTL_TEST_SEED", time.time_ns() % 2**31))
TOL = {torch.float32: (1e-3, 1e-3), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2.5e-2, 2.5e-2)}
DEV = "cuda"


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOL[dtype]
    assert not torch.isnan(actual).any(), f"{what}: NaN left in the output; seed={SEED}"
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}\nreplay with LLMCTL_TEST_SEED={SEED}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("group,block_size,window", [(1, 16, None), (4, 32, 256), (8, 16, None)])
def test_paged_attention_native(dtype, head, group, block_size, window):
    from llmctl_triton import paged_attention

    gen = torch.Generator().manual_seed(SEED + head + group)
    num_kv = 2
    q_lens = [1] * 6 + ragged(gen, 3, 17, 300)
    ctx_lens = ragged(gen, 6, 1, 2000) + [0, *ragged(gen, 2, 100, 900)]
    kv, meta = make_batch(gen, q_lens, ctx_lens, block_size, num_kv, head, dtype, DEV)
    query = torch.randn(meta.num_tokens, num_kv * group, head, generator=gen).to(dtype).to(DEV)
    expected = paged_attention_reference(query, kv, meta, head ** -0.5, window)
    out = torch.full_like(query, float("nan"))
    _close(paged_attention(query, kv, meta, head ** -0.5, window, out=out), expected, dtype, "mixed batch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 1000])
def test_split_k_native(dtype, window):
    from llmctl_triton import paged_attention, use_split_k

    gen = torch.Generator().manual_seed(SEED + 7)
    q_lens = [1] * 4
    ctx_lens = ragged(gen, 4, 1100, 8000)
    kv, meta = make_batch(gen, q_lens, ctx_lens, 16, 8, 128, dtype, DEV)
    assert use_split_k(meta, 8, torch.device(DEV))  # few long decodes: the heuristic picks split-K
    query = torch.randn(4, 32, 128, generator=gen).to(dtype).to(DEV)
    expected = paged_attention_reference(query, kv, meta, 128 ** -0.5, window)
    out = torch.full_like(query, float("nan"))
    _close(paged_attention(query, kv, meta, 128 ** -0.5, window, out=out), expected, dtype, "split-K")


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2])
def test_8bit_kv_cache_native(kv_dtype):
    """The 8-bit write (bytes equal to the reference's) and both attention paths over 8-bit codes and scales."""
    from llmctl.kv.cache_dtype import pack_rows
    from llmctl_triton import paged_attention
    from llmctl_triton.kv8 import write_kv8

    gen = torch.Generator().manual_seed(SEED + 13)
    kv, meta = make_batch(gen, [1] * 4 + [40, 7], ragged(gen, 4, 1, 3000) + [0, 33], 16, 2, 128, torch.float32, DEV)
    kv = pack_rows(kv, kv_dtype)
    key = torch.randn(meta.num_tokens, 2, 128, generator=gen).to(torch.bfloat16).to(DEV)
    value = torch.randn(meta.num_tokens, 2, 128, generator=gen).to(torch.bfloat16).to(DEV)
    expected_kv = kv.clone()
    write_kv_reference(key, value, expected_kv, meta.slot_mapping)
    write_kv8(key, value, kv, meta.slot_mapping)
    assert torch.equal(kv.view(torch.uint8), expected_kv.view(torch.uint8)), f"seed={SEED}"
    query = torch.randn(meta.num_tokens, 8, 128, generator=gen).to(torch.bfloat16).to(DEV)
    expected = paged_attention_reference(query, kv, meta, 128 ** -0.5)
    _close(paged_attention(query, kv, meta, 128 ** -0.5), expected, torch.bfloat16, "8-bit mixed batch")
    decodes = AttentionMetadata(
        num_tokens=4, num_seqs=4, query_start_loc=meta.query_start_loc[:5], seq_lens=meta.seq_lens[:4],
        block_tables=meta.block_tables[:4], slot_mapping=meta.slot_mapping[:4], max_query_len=1,
        max_seq_len=int(meta.seq_lens[:4].max()), block_size=16)
    _close(paged_attention(query[:4], kv, decodes, 128 ** -0.5, split_k=True, partition_size=256), expected[:4],
           torch.bfloat16, "8-bit split-K")


def test_write_kv_native():
    from llmctl_triton import write_kv

    gen = torch.Generator().manual_seed(SEED + 11)
    kv, meta = make_batch(gen, [1, 40, 7], [100, 0, 33], 16, 8, 128, torch.bfloat16, DEV)
    key = torch.randn(meta.num_tokens, 8, 128, generator=gen).to(torch.bfloat16).to(DEV)
    value = torch.randn(meta.num_tokens, 8, 128, generator=gen).to(torch.bfloat16).to(DEV)
    slots = meta.slot_mapping.clone()
    slots[::5] = -1
    expected = kv.clone()
    write_kv_reference(key, value, expected, slots)
    write_kv(key, value, kv, slots)
    assert torch.equal(kv, expected), f"seed={SEED}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_elementwise_ops_native(dtype):
    from llmctl_triton import fused_add_rms_norm, rms_norm, rotary_embedding, silu_and_mul

    gen = torch.Generator().manual_seed(SEED + 13)
    x = torch.randn(257, 4096, generator=gen).to(dtype).to(DEV)
    r = torch.randn(257, 4096, generator=gen).to(dtype).to(DEV)
    w = torch.randn(4096, generator=gen).to(dtype).to(DEV)
    _close(rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), dtype, "rms_norm")
    got = fused_add_rms_norm(x, r, w, 1e-5)
    exp = reference.fused_add_rms_norm(x, r, w, 1e-5)
    _close(got[0], exp[0], dtype, "fused_add_rms_norm")
    _close(got[1], exp[1], dtype, "fused_add_rms_norm residual")
    g = torch.randn(257, 2 * 14336, generator=gen).to(dtype).to(DEV)
    _close(silu_and_mul(g), reference.silu_and_mul(g), dtype, "silu_and_mul")
    for neox, rot in ((True, 128), (False, 64)):
        inv = 1.0 / (500000 ** (torch.arange(0, rot, 2).float() / rot))
        freqs = torch.arange(8192).float()[:, None] * inv[None, :]
        cache = torch.cat((freqs.cos(), freqs.sin()), -1).to(DEV)
        pos = torch.randint(0, 8192, (257,), generator=gen).to(DEV)
        q = torch.randn(257, 32, 128, generator=gen).to(dtype).to(DEV)
        k = torch.randn(257, 8, 128, generator=gen).to(dtype).to(DEV)
        for a, b in zip(rotary_embedding(pos, q, k, cache, neox), reference.rotary_embedding(pos, q, k, cache, neox),
                        strict=True):
            _close(a, b, dtype, f"rotary neox={neox} rot={rot}")


def test_graph_runner_replays_decode_attention():
    """Capture the Triton decode path in CUDA/HIP graphs and check replays at padded sizes match eager runs."""
    from llmctl_gpu.graph_runner import CudaGraphRunner
    from llmctl_triton import paged_attention, write_kv

    gen = torch.Generator().manual_seed(SEED + 17)
    max_batch, max_blocks, block_size, num_kv, head = 32, 64, 16, 2, 128
    kv = torch.randn(2, max_batch * max_blocks + 1, block_size, num_kv, head, generator=gen).half().to(DEV)
    static = {
        "q": torch.zeros(max_batch, 8, head, dtype=torch.float16, device=DEV),
        "k": torch.zeros(max_batch, num_kv, head, dtype=torch.float16, device=DEV),
        "seq_lens": torch.ones(max_batch, dtype=torch.int32, device=DEV),
        "slots": torch.full((max_batch,), -1, dtype=torch.int64, device=DEV),
        "block_tables": torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=DEV),
        "qsl": torch.arange(max_batch + 1, dtype=torch.int32, device=DEV),
    }

    def step(q, k, seq_lens, slots, block_tables, qsl):
        n = q.shape[0]
        write_kv(k, k, kv, slots)
        meta = AttentionMetadata(num_tokens=n, num_seqs=n, query_start_loc=qsl, seq_lens=seq_lens,
                                 block_tables=block_tables, slot_mapping=slots, max_query_len=1,
                                 max_seq_len=max_blocks * block_size, block_size=block_size)
        return paged_attention(q, kv, meta, head ** -0.5)

    def pad(views, n, batch):
        views["seq_lens"][n:].fill_(1)
        views["slots"][n:].fill_(-1)
        views["block_tables"][n:].zero_()
        views["qsl"][n + 1:] = torch.arange(n + 1, batch + 1, dtype=torch.int32, device=DEV)

    runner = CudaGraphRunner(step, static, extra_rows={"qsl": 1}, pad_fn=pad, max_batch_size=max_batch)
    runner.capture()
    assert sorted(runner.graphs) == [1, 2, 4, 8, 16, 32]
    for n in (1, 3, 13, 32):
        seq_lens = torch.randint(1, max_blocks * block_size, (n,), generator=gen).to(torch.int32)
        tables = (torch.arange(n * max_blocks).reshape(n, max_blocks) + 1).to(torch.int32)
        slots = torch.tensor([int(tables[i, (s - 1) // block_size]) * block_size + (s - 1) % block_size
                              for i, s in enumerate(seq_lens.tolist())])
        inputs = {"q": torch.randn(n, 8, head, generator=gen).half().to(DEV),
                  "k": torch.randn(n, num_kv, head, generator=gen).half().to(DEV),
                  "seq_lens": seq_lens.to(DEV), "slots": slots.to(DEV), "block_tables": tables.to(DEV),
                  "qsl": torch.arange(n + 1, dtype=torch.int32, device=DEV)}
        replayed = runner.run(**inputs).clone()
        eager = step(**inputs)
        assert runner.padded_size(n) >= n
        _close(replayed, eager, torch.float16, f"graph replay n={n}")


def test_flash_backends_when_installed():
    from llmctl_cuda.flash import FlashAttnBackend, FlashInferBackend

    gen = torch.Generator().manual_seed(SEED + 19)
    ran = []
    for backend, block_size in ((FlashAttnBackend(), 256), (FlashInferBackend(), 16)):
        if not backend.supports(torch.bfloat16, 128, block_size, frozenset({"sliding_window"})):
            continue
        kv, meta = make_batch(gen, [1, 1, 37, 5], [700, 20, 0, 300], block_size, 8, 128, torch.bfloat16, DEV)
        query = torch.randn(meta.num_tokens, 32, 128, generator=gen).bfloat16().to(DEV)
        for window in (None, 128):
            expected = paged_attention_reference(query, kv, meta, 128 ** -0.5, window)
            _close(backend.forward(query, kv, meta, 128 ** -0.5, window), expected, torch.bfloat16, backend.name)
        ran.append(backend.name)
    if not ran:
        pytest.skip("neither flash_attn nor flashinfer is installed and usable on this GPU")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantized_linear_kernels_native(dtype):
    """The Triton dequantizing GEMMs (int4, int8 weight-only) and, on GPUs with FP8 matrix units, the
    ``_scaled_mm`` FP8 W8A8 kernel: the testkit's quantization clause, compiled for this GPU."""
    from llmctl_testkit.checks import check_quant_method
    from llmctl_triton.quant import ScaledMmFp8Kernel, TritonIntKernel, fp8_matmul_support

    for fmt in ("int4", "int8"):
        assert check_quant_method(TritonIntKernel(fmt, "cuda"), torch.device(DEV), dtype) >= 1
    ran = check_quant_method(ScaledMmFp8Kernel("cuda"), torch.device(DEV), dtype)
    if dtype != torch.float32 and fp8_matmul_support():
        assert ran == 1
