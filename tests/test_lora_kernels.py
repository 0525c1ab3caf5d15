"""The ``lora_shrink_expand`` kernels against core's torch reference: the CPU plugin's C kernel (this host's build,
and a generic build without AVX-512 where this host can run it) and the Triton kernel in Triton's interpreter, at 1,
7, 64 and 300 rows of mixed adapter slots, base-model rows and a slot whose adapter skips the projection included.
The testkit clause is the same check a vendor's override gets."""

from __future__ import annotations

import pytest
import torch
from llmctl.ops import reference
from llmctl_testkit.checks import check_lora_shrink_expand, lora_case
from llmctl_testkit.harness import ContractViolation

from tests import native_builds

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kernel_passes_the_testkit_clause(dtype):
    from llmctl_cpu import native, ops

    if native.kernels() is None:
        pytest.skip(f"the CPU C kernels are not built here: {native.status()[1]}")
    check_lora_shrink_expand(ops.lora_shrink_expand, torch.device("cpu"), dtype)


def test_the_engine_resolves_the_cpu_kernel():
    from llmctl.plugins import get_plugin_manager
    from llmctl_cpu import ops

    resolved = get_plugin_manager().registry.resolve_ops("cpu")
    assert resolved.lora_shrink_expand is ops.lora_shrink_expand


def test_cpu_kernel_reads_only_each_slots_real_rank():
    """Garbage past a slot's rank must not reach y: the kernel stops at ``ranks[s]`` (the reference, which reads
    the padded part, sees the garbage; the stored slots keep it zero, so both agree in the engine)."""
    from llmctl_cpu import native, ops

    if native.kernels() is None:
        pytest.skip("the CPU C kernels are not built here")
    case = lora_case(64, torch.float32, torch.Generator().manual_seed(3))
    a, b, ranks = case["a"].clone(), case["b"].clone(), case["ranks"]
    want = case["y"].clone()
    reference.lora_shrink_expand(case["x"], want[:, 4:-4], a, b, case["token_slots"], case["active_slots"])
    for s, r in enumerate(ranks.tolist()):
        a[s, r:] = float("nan")
        b[s, r:] = float("nan")
    got = case["y"].clone()
    ops.lora_shrink_expand(case["x"], got[:, 4:-4], a, b, case["token_slots"], case["active_slots"], ranks)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got = got[:, 4:-4]
    with pytest.raises(ValueError, match="ranks"):
        ops.lora_shrink_expand(case["x"], got, a, b, case["token_slots"], case["active_slots"],
                               torch.tensor([17, 0, 0, 0], dtype=torch.int32))
    with pytest.raises(IndexError, match=r"token_slots\[0\] = 4 is outside the 4 LoRA slots"):
        ops.lora_shrink_expand(case["x"], got, a, b, torch.full_like(case["token_slots"], 4), (4,), ranks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_generic_build_without_avx512_matches_the_reference(dtype):
    lib = native_builds.runnable("x86-64")
    assert not lib.has_avx512

    def generic(x, y, a, b, token_slots, active_slots, ranks=None):
        if ranks is None:
            ranks = torch.full((a.shape[0],), a.shape[1], dtype=torch.int32)
        lib.lora_shrink_expand(x, y, a, b, token_slots, ranks)

    check_lora_shrink_expand(generic, torch.device("cpu"), dtype)


def test_the_clause_catches_a_kernel_that_runs_base_rows_or_drops_a_rank():
    def base_rows_too(x, y, a, b, token_slots, active_slots, ranks=None):
        reference.lora_shrink_expand(x, y, a, b, token_slots.clamp(min=0), tuple(range(a.shape[0])), ranks)

    def first_rank_row_only(x, y, a, b, token_slots, active_slots, ranks=None):
        reference.lora_shrink_expand(x, y, a[:, :1].contiguous(), b[:, :1].contiguous(), token_slots,
                                     active_slots)

    for wrong in (base_rows_too, first_rank_row_only):
        with pytest.raises(ContractViolation, match=r"^\[ops\.lora_shrink_expand\]"):
            check_lora_shrink_expand(wrong, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernel_in_the_interpreter(dtype):
    import os

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py sets it)")
    pytest.importorskip("triton")
    from llmctl_triton.lora import lora_shrink_expand

    # The interpreter runs every program instance in numpy, the 16-bit ones slowest: the 300-row batch (the same
    # tiling as 64 rows, five times over) runs in float32 only.
    rows = (1, 7, 64, 300) if dtype == torch.float32 else (1, 7, 64)
    check_lora_shrink_expand(lora_shrink_expand, torch.device("cpu"), dtype, row_counts=rows)


def test_triton_override_is_registered_for_the_gpu_platforms():
    pytest.importorskip("triton")
    from llmctl_triton.backend import op_overrides

    assert "lora_shrink_expand" in {op.name for op in op_overrides("cuda")}
