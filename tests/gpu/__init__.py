"""GPU-only tests. Every module here skips itself without a GPU through :data:`REQUIRES_GPU`."""

from __future__ import annotations

import os

import pytest
import torch

REQUIRES_GPU = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU (torch.cuda.is_available() "
                                                             "is False)"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="TRITON_INTERPRET is set (the CPU kernel tests ran in this process); run tests/gpu in "
                              "its own pytest process to test compiled kernels"),
]
