"""float32 linears on MKL's packed GEMM (``cblas_sgemm_pack`` / ``cblas_sgemm_compute``), from torch's own MKL.

Why: a float32 decode step is GEMM-bound, and MKL's packed-B GEMM beat oneDNN's prepacked linear on SmolLM2-135M's
projections over 30 layers on two Sapphire Rapids cores (64 rows: 11.4 vs 14.1 ms for 1536x576, 11.7 vs 17.2 ms
for 576x1536; 1024 rows: 140 vs 161 and 138 vs 153 ms; 1 row: 2.9 vs 3.5 ms). torch's x86 builds link MKL into
``libtorch_cpu.so`` and export its CBLAS symbols, so nothing is installed and MKL runs on torch's own OpenMP
threads. Packed for 64 rows, a row's result is the same bits at every batch size (checked for 1-1024 rows), which
the engine's batch-invariance tests rely on (one row runs as two identical rows: MKL computes a lone row of some
shapes another way; weights of fewer than 16 outputs stay on oneDNN for the same reason).

``cblas_sgemm_pack_get_size`` asks for several times the matrix (13.9 MB for a 3.5 MB 1536x576 matrix); MKL
writes only about the matrix's own size of it, and the rest stays untouched, uncommitted memory.

Where the symbols are missing (another torch build, another architecture) :func:`available` is False and float32
weights stay on oneDNN.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from llmctl_cpu.native import env_on
from llmctl_cpu.packed_weight import PackedFormat, PackedWeight, packed

logger = logging.getLogger(__name__)

_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162
PACK_ROWS = 64  # the row count the packing is tuned for; any row count may use it
DISABLE_ENV = "LLMCTL_CPU_MKL_SGEMM"


class _Api:
    def __init__(self, lib: ctypes.CDLL) -> None:
        c_int, c_float, c_ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        self.get_size = lib.cblas_sgemm_pack_get_size
        self.get_size.restype = ctypes.c_size_t
        self.get_size.argtypes = [c_int, c_int, c_int, c_int]
        self.pack = lib.cblas_sgemm_pack
        self.pack.restype = None
        self.pack.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, c_float, c_ptr, c_int, c_ptr]
        self.compute = lib.cblas_sgemm_compute
        self.compute.restype = None
        self.compute.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, c_ptr, c_int, c_ptr, c_int, c_float, c_ptr,
                                 c_int]


@functools.cache
def _api() -> _Api | None:
    if not env_on(DISABLE_ENV):
        return None
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        return _Api(ctypes.CDLL(path))
    except (OSError, AttributeError) as exc:
        logger.debug("MKL packed sgemm not available in %s: %s", path, exc)
        return None


def available() -> bool:
    return _api() is not None


MIN_OUT_FEATURES = 16  # a one-column weight took other paths at different row counts (other bits): oneDNN keeps those


def takes(weight: torch.Tensor) -> bool:
    """Whether :func:`pack` should take this weight (float32, 2-D, wide enough, MKL present)."""
    return (weight.dtype is torch.float32 and weight.dim() == 2 and weight.shape[0] >= MIN_OUT_FEATURES
            and weight.shape[1] > 0 and available())


def pack(weight: torch.Tensor) -> PackedWeight:
    """``weight`` [n, k] float32 -> MKL's packed form of ``weight^T`` (the GEMM's B)."""
    api = _api()
    assert api is not None, "check available() first"
    n, k = (int(s) for s in weight.shape)
    w = weight.contiguous()
    size = int(api.get_size(_B_MATRIX, PACK_ROWS, n, k))
    buf = torch.empty(-(-size // 4), dtype=torch.float32)
    api.pack(_ROW_MAJOR, _B_MATRIX, _TRANS, PACK_ROWS, n, k, 1.0, w.data_ptr(), k, buf.data_ptr())
    return packed(buf, PackedFormat.MKL_F32, weight)


def linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight^T + bias`` for a weight from :func:`pack`; ``x`` [..., k] float32."""
    api = _api()
    assert api is not None and weight.format is PackedFormat.MKL_F32
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: input has {x.shape[-1]} features, the weight expects {k}")
    if x.dtype is not torch.float32:
        raise TypeError(f"linear: input is {x.dtype}, the packed weight is torch.float32")
    rows = x.reshape(-1, k)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    if m == 1:  # MKL takes another path for one row of some shapes (other bits): run it as two identical rows
        rows = rows.expand(2, k).contiguous()
    out = torch.empty((rows.shape[0], n), dtype=torch.float32)
    if m:
        # beta = 0 always: with C pre-filled with the bias and beta = 1, MKL returned the bias alone for one row
        api.compute(_ROW_MAJOR, _NO_TRANS, _PACKED, rows.shape[0], n, k, rows.data_ptr(), rows.stride(0),
                    weight.data.data_ptr(), n, 0.0, out.data_ptr(), n)
    out = out[:m]
    if bias is not None:
        out.add_(bias)
    return out.view(*x.shape[:-1], n)
