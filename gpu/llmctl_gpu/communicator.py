"""Collectives for CUDA and ROCm GPUs: torch.distributed with NCCL (RCCL behind the same name on ROCm)."""

from __future__ import annotations

import torch
from llmctl.distributed import TorchDistributedCommunicator


class GpuCommunicator(TorchDistributedCommunicator):
    """Core's torch.distributed communicator with NCCL (RCCL on ROCm): each rank binds its GPU first and hands it
    to ``init_process_group(device_id=...)``, which makes NCCL initialise eagerly instead of hanging lazily."""

    def __init__(self, name: str, platform: str, backend: str = "nccl") -> None:
        super().__init__(name=name, platform=platform, backend=backend)

    def prepare_device(self, rank: int) -> torch.device | None:
        if self.backend != "nccl":
            return None
        if not torch.cuda.is_available():
            raise RuntimeError(f"communicator {self.name!r} needs a GPU: torch.cuda.is_available() is False")
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
