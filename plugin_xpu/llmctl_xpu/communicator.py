"""Collectives across Intel GPUs on torch.distributed (xccl in torch >= 2.8, oneCCL's "ccl" before)."""

from __future__ import annotations

import torch
from llmctl.distributed import TorchDistributedCommunicator

from llmctl_xpu.platform import xpu_dist_backend


class XpuCommunicator(TorchDistributedCommunicator):
    def __init__(self) -> None:
        super().__init__(name="xpu-ccl", platform="xpu", backend="xccl")

    def backend_name(self) -> str:
        backend = xpu_dist_backend()
        if backend == "ccl":
            try:
                import oneccl_bindings_for_pytorch  # noqa: F401  (registers the "ccl" backend)
            except ImportError as exc:
                raise RuntimeError("torch has no xccl backend and oneccl_bindings_for_pytorch is not installed; "
                                   "upgrade torch to >= 2.8 or pip install oneccl_bind_pt") from exc
        return backend

    def prepare_device(self, rank: int) -> torch.device | None:
        torch.xpu.set_device(rank % max(torch.xpu.device_count(), 1))
        return None
