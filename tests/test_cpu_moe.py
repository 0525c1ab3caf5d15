"""The CPU plugin's ``fused_moe`` (``llmctl_cpu.moe`` and ``native/kernels/moe.c``) against core's torch reference.

Random cases through the testkit's clause in float32 and bf16; exact equality where the reference's arithmetic is
exact (small integers, so every GEMM sum and product is representable and SiLU is evaluated only where it is exact);
rows independent of the batch bit for bit; the shapes the kernel declines; bad routing ids; and a tiny Mixtral
through the whole engine, on the kernel, against transformers.
"""

from __future__ import annotations

import pytest
import torch
from llmctl.ops import reference
from llmctl_cpu import moe, native
from llmctl_cpu.packed_weight import PackedExperts
from llmctl_testkit import checks

from tests.moe_cases import EXACT_SHAPES, integer_case

DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture(autouse=True)
def _kernel() -> None:
    lib = native.kernels()
    if lib is None or not lib.has_fused_moe:
        pytest.skip(f"no C fused_moe on this host ({native.status()[1]})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_testkit_clause(dtype):
    checks.check_fused_moe(moe.pack_fused_moe_weights, moe.fused_moe, torch.device("cpu"), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_where_the_reference_is_exact(dtype):
    gen = torch.Generator().manual_seed(3)
    for shape in EXACT_SHAPES:
        x, w13, w2, weights, ids = integer_case(*shape, dtype, gen)
        expected = reference.fused_moe(x, w13, w2, weights, ids)
        assert expected.abs().max() > 100  # outputs are large enough for bf16 to round the products and sums
        got = moe.fused_moe(x, *moe.pack_fused_moe_weights(w13, w2), weights, ids)
        assert torch.equal(got, expected), f"{shape}: max diff {(got.float() - expected.float()).abs().max()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_do_not_depend_on_the_batch(dtype):
    gen = torch.Generator().manual_seed(5)
    case = checks.moe_case(37, 96, 48, 8, 2, dtype, gen)
    packed = moe.pack_fused_moe_weights(case["w13"], case["w2"])
    x, w, ids = case["hidden"], case["topk_weights"], case["topk_ids"]
    full = moe.fused_moe(x, *packed, w, ids)
    for lo, hi in ((0, 1), (5, 6), (3, 20), (36, 37)):
        assert torch.equal(moe.fused_moe(x[lo:hi], *packed, w[lo:hi], ids[lo:hi]), full[lo:hi]), (lo, hi)
    long = checks.moe_case(moe.CHUNK_TOKENS + 37, 96, 48, 8, 2, dtype, gen)  # more tokens than one kernel call
    x, w, ids = long["hidden"], long["topk_weights"], long["topk_ids"]
    full = moe.fused_moe(x, *packed, w, ids)
    assert torch.equal(moe.fused_moe(x[-40:], *packed, w[-40:], ids[-40:]), full[-40:])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(full, reference.fused_moe(x, case["w13"], case["w2"], w, ids), atol=tol, rtol=tol)


def test_packs_only_what_the_kernel_runs(monkeypatch):
    w13, w2 = torch.randn(4, 64, 32), torch.randn(4, 32, 32)
    packed = moe.pack_fused_moe_weights(w13, w2, "silu")
    assert isinstance(packed[0], PackedExperts) and packed[0].shape == (4, 64, 32) and packed[1].shape == (4, 32, 32)
    assert moe.pack_fused_moe_weights(w13, w2, "gelu") is None  # the kernel's epilogue is SiLU
    assert moe.pack_fused_moe_weights(torch.randn(4, 48, 32), torch.randn(4, 32, 24)) is None  # I not 16-wide
    assert moe.pack_fused_moe_weights(w13.half(), w2.half()) is None
    assert moe.pack_fused_moe_weights(w13, torch.randn(4, 32, 16)) is None  # shapes that do not pair
    monkeypatch.setenv(moe.MOE_NATIVE_ENV, "0")
    assert moe.pack_fused_moe_weights(w13, w2) is None
    # plain weights (a declined pack) run the reference itself
    x, ids = torch.randn(3, 32), torch.tensor([[0, 1], [2, 3], [1, 0]])
    weights = torch.rand(3, 2)
    for act in ("silu", "gelu"):
        assert torch.equal(moe.fused_moe(x, w13, w2, weights, ids, act), reference.fused_moe(x, w13, w2, weights, ids,
                                                                                              act))


def test_bad_input_names_the_field():
    w13, w2 = torch.randn(4, 64, 32), torch.randn(4, 32, 32)
    packed = moe.pack_fused_moe_weights(w13, w2)
    x, weights = torch.randn(2, 32), torch.rand(2, 2)
    with pytest.raises(IndexError, match="topk_ids holds expert 4, outside the layer's 4 experts"):
        moe.fused_moe(x, *packed, weights, torch.tensor([[0, 1], [4, 2]]))
    with pytest.raises(IndexError, match="expert -1"):
        moe.fused_moe(x, *packed, weights, torch.tensor([[0, -1], [3, 2]]))
    with pytest.raises(ValueError, match="hidden has 16 features, the experts expect 32"):
        moe.fused_moe(torch.randn(2, 16), *packed, weights, torch.tensor([[0, 1], [3, 2]]))
    with pytest.raises(TypeError, match="hidden is torch.bfloat16"):
        moe.fused_moe(x.bfloat16(), *packed, weights, torch.tensor([[0, 1], [3, 2]]))
    with pytest.raises(ValueError, match=r"topk_ids \(2, 3\) and topk_weights \(2, 2\)"):
        moe.fused_moe(x, *packed, weights, torch.tensor([[0, 1, 2], [3, 2, 1]]))
    with pytest.raises(ValueError, match="packed for SiLU"):
        moe.fused_moe(x, *packed, weights, torch.tensor([[0, 1], [3, 2]]), "gelu")


def test_mixtral_runs_on_the_kernel_and_matches_transformers(model_cache_dir, test_tokenizer):
    """The tiny Mixtral of the family tests, through the engine: its experts are packed for the C kernel, and fp32
    greedy tokens and top-5 logprobs still agree with transformers."""
    from llmctl import LLM

    from tests.family_factory import make_family_model
    from tests.test_engine_vs_transformers import assert_matches_hf
    from tests.test_model_families import FAMILY_PROMPTS, SMALL_KV

    path, hf_model = make_family_model("mixtral", model_cache_dir / "family-mixtral", test_tokenizer)
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=32, num_threads=1, kv_cache_memory=SMALL_KV)
    layers = [m for m in llm.llm_engine.core.model.modules() if type(m).__name__ == "SparseMoE"]
    assert layers and all(isinstance(m._packed[0], PackedExperts) for m in layers)
    assert all(m.w13.numel() == 0 for m in layers)  # the plain stacks were released
    assert_matches_hf(path, llm, {}, FAMILY_PROMPTS, model=hf_model, tok=test_tokenizer)
