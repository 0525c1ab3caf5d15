"""Which GEMM runs a float32 linear on this host, chosen so that a row's bits never depend on the batch.

Float32 batch invariance is a promise on every host the kernels run on. Three GEMMs can run a float32 linear:

- MKL's packed GEMM (:mod:`llmctl_cpu.mkl_sgemm`) keeps a row's bits at every batch size on some hosts (Sapphire
  Rapids) and not on others (AMD EPYC, where MKL dispatches other kernels). It is taken for a weight shape only
  when a self-check on the running host, at the first weight of that shape, finds every row identical alone and
  in batches of the sizes that changed MKL's kernels where it failed.
- The C GEMM (``llmctl_gemm_f32`` in the native kernels) sums each output element in one fixed order whatever
  the batch, so it is invariant by construction; it is the path wherever MKL is refused and the kernels build
  (AVX2 + FMA or AVX-512).
- oneDNN (the last resort, without a compiler or without AVX2): not batch-invariant, and ``llmctl doctor`` says so.

``LLMCTL_CPU_F32_GEMM`` = ``auto`` (the above), ``c``, ``mkl`` (still self-checked) or ``onednn`` pins a path.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from llmctl_cpu import mkl_sgemm, native

PATH_ENV = "LLMCTL_CPU_F32_GEMM"
_PATHS = ("auto", "c", "mkl", "onednn")

# Row counts whose prefixes are compared against a 300-row batch: one row (MKL takes another path there), the
# tile and panel edges (16, 63-65, 129) and a few odd sizes; MKL's AMD failures showed at these.
CHECK_BATCH = 300
CHECK_PREFIXES = (1, 2, 3, 7, 16, 17, 33, 63, 64, 65, 129, 257)
CHECK_ROWS = (0, 150, 299)
CHECK_MAX_OUT = 2048  # wider weights are checked on their first CHECK_MAX_OUT outputs (the LM head)


def requested_path() -> str:
    value = os.environ.get(PATH_ENV, "auto").strip().lower() or "auto"
    if value not in _PATHS:
        raise ValueError(f"{PATH_ENV}={value!r}: must be one of {', '.join(_PATHS)}")
    return value


def c_gemm_available() -> bool:
    lib = native.kernels()
    return lib is not None and lib.has_gemm_f32


@functools.cache
def mkl_is_batch_invariant(n: int, k: int) -> bool:
    """The self-check for one weight shape: a random weight of that shape through MKL's packed GEMM, every checked
    row compared bit for bit alone and inside batches of every checked size."""
    gen = torch.Generator().manual_seed(n * 100003 + k)
    weight = torch.randn(min(n, CHECK_MAX_OUT), k, generator=gen)
    x = torch.randn(CHECK_BATCH, k, generator=gen)
    packed = mkl_sgemm.pack(weight)
    with torch.inference_mode():
        full = mkl_sgemm.linear(x, packed, None)
        if any(not torch.equal(mkl_sgemm.linear(x[:m], packed, None), full[:m]) for m in CHECK_PREFIXES):
            return False
        return all(torch.equal(mkl_sgemm.linear(x[i:i + 1], packed, None), full[i:i + 1]) for i in CHECK_ROWS)


def path_for(weight: torch.Tensor) -> str:
    """``"mkl"``, ``"c"`` or ``"onednn"`` for a float32 [n, k] weight on this host."""
    n, k = (int(s) for s in weight.shape)
    want = requested_path()
    mkl_ok = want in ("auto", "mkl") and mkl_sgemm.takes(weight) and mkl_is_batch_invariant(n, k)
    if mkl_ok:
        return "mkl"
    if want in ("auto", "c", "mkl") and c_gemm_available():
        return "c"
    return "onednn"


@dataclass(frozen=True)
class Float32Report:
    """What ``llmctl doctor`` says about float32 linears: the path for a typical weight, and why."""
    path: str
    batch_invariant: bool
    why: str


def report(shape: tuple[int, int] = (1536, 576)) -> Float32Report:
    """Runs the choice for one representative shape (SmolLM2's MLP) and says why it fell that way."""
    weight = torch.empty(shape)
    path = path_for(weight)
    want = requested_path()
    if path == "mkl":
        return Float32Report("MKL packed GEMM", True, "its self-check found rows batch-invariant on this host")
    mkl_why = ("not checked: " + f"{PATH_ENV}={want}" if want in ("c", "onednn")
               else "not in this torch or switched off" if not mkl_sgemm.available()
               else "refused: its rows depend on the batch on this host")
    if path == "c":
        return Float32Report("C GEMM", True, f"invariant by construction; MKL {mkl_why}")
    c_why = (f"{PATH_ENV}=onednn" if want == "onednn" else "no C kernels" if native.kernels() is None
             else "the C kernels need AVX2 + FMA")
    return Float32Report("oneDNN", False, f"{c_why}; MKL {mkl_why}")
