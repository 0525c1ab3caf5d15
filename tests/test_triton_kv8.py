"""The Triton backend over 8-bit KV caches (``llmctl_triton.kv8``) against core's torch reference, in Triton's CPU
interpreter: the quantizing write gives the reference's bytes, and both attention paths (single pass and split-K)
read codes and scales as the reference does."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / llmctl_triton

import pytest  # noqa: E402
import torch  # noqa: E402
from llmctl.kv.cache_dtype import pack_rows  # noqa: E402
from llmctl.ops.paged_attention import paged_attention_reference, write_kv_reference  # noqa: E402

from tests.gpu.paged_batch import make_batch as _make_batch  # noqa: E402
from tests.gpu.paged_batch import ragged as _ragged  # noqa: E402
from tests.test_kv_cache_kernels import _special_rows  # noqa: E402

llmctl_triton = pytest.importorskip("llmctl_triton", reason="install llmctl-triton: pip install -e ./triton_kernels")
from llmctl_triton import TritonAttentionBackend, paged_attention  # noqa: E402
from llmctl_triton.kv8 import write_kv8  # noqa: E402

KV8 = [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2]
IDS = ["int8", "fp8_e4m3", "fp8_e5m2"]
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2.5e-2, 2.5e-2)}


def _batch(seed, q_lens, ctx_lens, block_size, num_kv, head, kv_dtype):
    """_make_batch's step over an 8-bit cache: every slot (spare blocks included) holds packed random rows."""
    gen = torch.Generator().manual_seed(seed)
    kv, meta = _make_batch(gen, q_lens, ctx_lens, block_size, num_kv, head, torch.float32)
    return gen, pack_rows(kv, kv_dtype), meta


@pytest.mark.parametrize("kv_dtype", KV8, ids=IDS)
@pytest.mark.parametrize("dtype,head,num_kv,group,block_size,window", [
    (torch.float32, 64, 2, 4, 16, None),
    (torch.float16, 128, 1, 8, 32, None),
    (torch.bfloat16, 80, 2, 1, 16, None),
    (torch.bfloat16, 64, 2, 3, 1, 20),
])
def test_mixed_batch_on_an_8bit_cache(kv_dtype, dtype, head, num_kv, group, block_size, window):
    gen, kv, meta = _batch(11 + head + group + block_size, [1, 1, 9, 1, 6], [30, 70, 0, 5, 41], block_size,
                           num_kv, head, kv_dtype)
    query = torch.randn(meta.num_tokens, num_kv * group, head, generator=gen).to(dtype)
    scale = head ** -0.5
    expected = paged_attention_reference(query, kv, meta, scale, window)
    out = torch.full_like(query, float("nan"))
    got = paged_attention(query, kv, meta, scale, window, out=out, split_k=False)
    assert not got.isnan().any()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("kv_dtype", KV8, ids=IDS)
def test_split_k_decode_on_an_8bit_cache(kv_dtype):
    gen = torch.Generator().manual_seed(5)
    ctx = [*_ragged(gen, 3, 40, 160), 2]
    _, kv, meta = _batch(6, [1] * 4, ctx, 16, 2, 64, kv_dtype)
    query = torch.randn(meta.num_tokens, 8, 64, generator=gen).to(torch.float16)
    expected = paged_attention_reference(query, kv, meta, 0.125)
    got = paged_attention(query, kv, meta, 0.125, split_k=True, partition_size=32)
    torch.testing.assert_close(got.float(), expected.float(), atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("kv_dtype", KV8, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_gives_the_reference_bytes(kv_dtype, dtype):
    for head in (64, 80):
        key, value = _special_rows(20, 3, head, dtype), _special_rows(20, 3, head, dtype).flip(0)
        slots = torch.randperm(64, generator=torch.Generator().manual_seed(head))[:20]
        slots[3] = -1
        want = torch.zeros(2, 4, 16, 3, head + 4, dtype=kv_dtype)
        got = torch.zeros_like(want)
        write_kv_reference(key, value, want, slots)
        write_kv8(key, value, got, slots)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (kv_dtype, dtype, head)


def test_backend_declares_and_runs_8bit_caches():
    backend = TritonAttentionBackend("cuda")
    for feature in ("kv_cache_int8", "kv_cache_fp8_e4m3", "kv_cache_fp8_e5m2"):
        assert backend.supports(torch.bfloat16, 64, 16, frozenset({"prefix_caching", feature}))
    gen, kv, meta = _batch(9, [4, 1], [0, 33], 16, 2, 64, torch.int8)
    key = torch.randn(meta.num_tokens, 2, 64, generator=gen).to(torch.bfloat16)
    value = torch.randn_like(key)
    want = kv.clone()
    write_kv_reference(key, value, want, meta.slot_mapping)
    backend.write_kv(key, value, kv, meta.slot_mapping)
    assert torch.equal(kv, want)
    query = torch.randn(meta.num_tokens, 4, 64, generator=gen).to(torch.bfloat16)
    torch.testing.assert_close(backend.forward(query, kv, meta, 0.125).float(),
                               paged_attention_reference(query, kv, meta, 0.125).float(), atol=2.5e-2, rtol=2.5e-2)
