"""``llmctl doctor`` lines for ``example-cpu``; a check reports problems, it never raises."""

from __future__ import annotations

import torch
from llmctl.plugins.types import DoctorResult


def runtime_check() -> DoctorResult:
    # VENDOR: check your driver / firmware / runtime library versions and say how to fix a mismatch.
    try:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_gloo_available():
            return DoctorResult(False, "torch.distributed with gloo is unavailable: tensor parallelism will not work",
                                hint="install a torch build with distributed support")
        return DoctorResult(True, f"torch {torch.__version__}, {torch.get_num_threads()} threads, gloo available")
    except Exception as exc:
        return DoctorResult(False, f"check failed: {type(exc).__name__}: {exc}")
