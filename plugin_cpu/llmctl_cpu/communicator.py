"""``gloo``: tensor-parallel collectives for CPU processes, core's torch.distributed communicator on gloo."""

from __future__ import annotations

from llmctl.distributed import TorchDistributedCommunicator


class GlooCommunicator(TorchDistributedCommunicator):
    def __init__(self, timeout_s: float = 300.0) -> None:
        super().__init__(name="gloo", platform="cpu", backend="gloo", timeout_s=timeout_s)
