"""The sampler's ops in C (the logprobs of sampled tokens, the draw of a temperature-only batch) against core's
torch references (the oracles)."""

from __future__ import annotations

import pytest
import torch
from llmctl.ops import reference
from llmctl_cpu import native
from llmctl_cpu.ops import sample_softmax, sampled_logprobs

needs_native = pytest.mark.skipif(native.kernels() is None or not native.kernels().has_argmax,
                                  reason="the C kernels with the row-wise paths are not built here")


def _check(x: torch.Tensor, chosen: torch.Tensor, k: int, tied_rows: tuple[int, ...] = ()) -> None:
    """Equal to the reference; in ``tied_rows`` (equal logits in the top k) the ids as a set, since torch's topk
    orders ties as it likes."""
    got = sampled_logprobs(x, chosen, k)
    want = reference.sampled_logprobs(x, chosen, k)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5, equal_nan=True)
    for r in range(x.shape[0]):
        if r in tied_rows:
            assert sorted(got[3][r].tolist()) == sorted(want[3][r].tolist())
        else:
            assert got[3][r].tolist() == want[3][r].tolist()


@needs_native
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_kernel_equals_reference(rows, k):
    g = torch.Generator().manual_seed(rows * 31 + k)
    x = torch.randn(rows, 4099, generator=g) * 4  # an odd vocabulary: no vector-width multiple
    chosen = torch.randint(0, x.shape[1], (rows,), generator=g)
    _check(x, chosen, k)
    _check(x[:, 1:], chosen.clamp(max=x.shape[1] - 2), k)  # rows with a stride longer than their length


@needs_native
def test_masked_and_non_finite_rows():
    """-inf logits (masked), a row all -inf, a NaN and a +inf (those two rows go to the reference)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=g)
    x[0, :250] = float("-inf")
    x[1] = float("-inf")
    x[2, 17] = float("nan")
    x[3, 5] = float("inf")
    chosen = torch.tensor([260, 3, 17, 5, 299])
    _check(x, chosen, 4, tied_rows=(1,))
    got = sampled_logprobs(x, chosen, 4)
    assert got[1][0] == 1 + int((x[0] > x[0, 260]).sum()) and got[1][1] == 1


@needs_native
def test_ties_keep_the_smaller_index_first():
    x = torch.zeros(2, 100)
    x[:, [10, 40, 70]] = 3.0
    got = sampled_logprobs(x, torch.tensor([40, 0]), 4)
    assert got[3].tolist() == [[10, 40, 70, 0], [10, 40, 70, 0]]
    assert got[1].tolist() == [1, 4]


@needs_native
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_draw_equals_reference(rows):
    """Uniforms away from the ends: the same tokens as the reference (the weights differ only by rounding), over
    temperatures from near-greedy to flat, with masked logits."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 4099, generator=g) * 3
    x[:, ::7] = float("-inf")
    temps = torch.rand(rows, generator=g) * 1.9 + 0.1
    u = torch.rand(rows, generator=g) * 0.98 + 0.01
    got = sample_softmax(x, temps, u)
    want = reference.sample_softmax(x, temps, u)
    assert torch.equal(got, want)
    assert bool((x.gather(1, got.unsqueeze(1)) > float("-inf")).all())  # never a masked token


@needs_native
def test_draw_ends_and_bad_rows():
    """u = 0 draws the first token with weight, u just under 1 the last one; a NaN row, an all -inf row and a zero
    temperature go to the reference."""
    x = torch.randn(5, 300)
    x[:, :3] = float("-inf")
    x[2, 10] = float("nan")
    x[3] = float("-inf")
    temps = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    u = torch.tensor([0.0, 1.0 - 2**-24, 0.5, 0.5, 0.5])
    got = sample_softmax(x, temps, u)
    want = reference.sample_softmax(x, temps, u)
    assert got[0] == 3 and got[1] == 299
    assert torch.equal(got[2:], want[2:])
