"""Collectives for ``example-cpu`` on torch.distributed with the gloo backend.

The communicator owns its own process group (``new_group`` over the default one), so destroying it leaves any
group the application created alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from llmctl.plugins.types import Communicator


class ExampleGlooCommunicator(Communicator):
    name = "example-gloo"
    platform = "example-cpu"
    backend = "gloo"  # VENDOR: your torch.distributed backend, e.g. "xccl", "hccl"

    def __init__(self) -> None:
        self._group: dist.ProcessGroup | None = None
        self._owns_default = False
        self.rank = 0
        self.world_size = 1

    def init(self, rank: int, world_size: int, init_method: str) -> None:
        # VENDOR: select the device of this rank first if your runtime needs it (e.g. torch.xpu.set_device).
        if not dist.is_initialized():
            dist.init_process_group(self.backend, init_method=init_method, rank=rank, world_size=world_size)
            self._owns_default = True
        self._group = dist.new_group(list(range(world_size)), backend=self.backend)
        self.rank, self.world_size = rank, world_size

    def _g(self) -> dist.ProcessGroup:
        if self._group is None:
            raise RuntimeError(f"{self.name}: init() was not called")
        return self._group

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._g())
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self._g())
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(tensor, src=src, group=self._g())
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor.contiguous(), dst=dst, group=self._g())

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        dist.recv(tensor, src=src, group=self._g())
        return tensor

    def barrier(self) -> None:
        dist.barrier(group=self._g())

    def destroy(self) -> None:
        if self._group is not None and dist.is_initialized():
            dist.destroy_process_group(self._group)
        self._group = None
        if self._owns_default and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_default = False
