"""Collectives across TPU chips with torch_xla's XLA collectives (compiled into the graph, over ICI).

Ranks are the XLA processes that ``torch_xla`` / PJRT started (one per chip with ``xmp.spawn`` or
``torchrun``); ``init`` only checks that the runtime agrees with core about the rank and world size.
"""

from __future__ import annotations

import torch
from llmctl.plugins.types import Communicator


class XlaCommunicator(Communicator):
    name = "xla-collectives"
    platform = "tpu"

    def __init__(self) -> None:
        self.world_size = 1
        self.rank = 0

    def init(self, rank: int, world_size: int, init_method: str) -> None:
        import torch_xla.runtime as xr

        if world_size > 1:
            actual = (xr.global_ordinal(), xr.world_size())
            if actual != (rank, world_size):
                raise RuntimeError(f"XLA runtime reports rank/world {actual}, core asked for {(rank, world_size)}; "
                                   f"start one process per chip through torch_xla (PJRT)")
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch_xla.core.xla_model as xm

        if self.world_size == 1:
            return tensor
        result = xm.all_reduce(xm.REDUCE_SUM, tensor)
        tensor.copy_(result)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        import torch_xla.core.xla_model as xm

        if self.world_size == 1:
            return tensor.clone()
        return xm.all_gather(tensor, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        import torch_xla.core.xla_model as xm

        if self.world_size == 1:
            return tensor
        xm.collective_broadcast([tensor], root_ordinal=src)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        # XLA has no point-to-point primitive that pairs arbitrary ranks outside a compiled graph; pipeline
        # parallelism on TPU is out of scope for this plugin, so say so instead of deadlocking.
        raise NotImplementedError("llmctl-tpu: point-to-point send is not supported (no pipeline parallelism "
                                  "on TPU); use tensor parallelism")

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        raise NotImplementedError("llmctl-tpu: point-to-point recv is not supported (no pipeline parallelism "
                                  "on TPU); use tensor parallelism")

    def barrier(self) -> None:
        import torch_xla.core.xla_model as xm

        if self.world_size > 1:
            xm.rendezvous("llmctl-barrier")

    def destroy(self) -> None:
        self.world_size, self.rank = 1, 0
