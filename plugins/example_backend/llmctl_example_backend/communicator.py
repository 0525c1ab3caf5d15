"""Collectives for ``example-cpu``: core's torch.distributed communicator with the gloo backend.

Core's ``TorchDistributedCommunicator`` already implements the contract (identity at world size 1, owning only
the groups it created); a backend usually overrides just the two seams below.
"""

from __future__ import annotations

import torch
from llmctl.distributed import TorchDistributedCommunicator


class ExampleGlooCommunicator(TorchDistributedCommunicator):
    def __init__(self) -> None:
        # VENDOR: your communicator's name, your platform and your torch.distributed backend ("xccl", "hccl", ...)
        super().__init__(name="example-gloo", platform="example-cpu", backend="gloo")

    def prepare_device(self, rank: int) -> torch.device | None:
        # VENDOR: select this rank's device if your runtime needs it (e.g. torch.xpu.set_device(rank)) and return
        # it when your backend wants init_process_group(device_id=...); the CPU has nothing to select.
        return None
