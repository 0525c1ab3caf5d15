"""Collectives across Intel GPUs on torch.distributed (xccl in torch >= 2.8, oneCCL's "ccl" before)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from llmctl.plugins.types import Communicator

from llmctl_xpu.platform import xpu_dist_backend


class XpuCommunicator(Communicator):
    name = "xpu-ccl"
    platform = "xpu"

    def __init__(self) -> None:
        self._group: dist.ProcessGroup | None = None
        self._owns_default = False
        self.world_size = 1

    def init(self, rank: int, world_size: int, init_method: str) -> None:
        backend = xpu_dist_backend()
        if backend == "ccl":
            try:
                import oneccl_bindings_for_pytorch  # noqa: F401  (registers the "ccl" backend)
            except ImportError as exc:
                raise RuntimeError("torch has no xccl backend and oneccl_bindings_for_pytorch is not installed; "
                                   "upgrade torch to >= 2.8 or pip install oneccl_bind_pt") from exc
        torch.xpu.set_device(rank % max(torch.xpu.device_count(), 1))
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
            self._owns_default = True
        self._group = dist.new_group(list(range(world_size)), backend=backend)
        self.world_size = world_size

    def _g(self) -> dist.ProcessGroup:
        if self._group is None:
            raise RuntimeError("xpu communicator: init() was not called")
        return self._group

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self._g())
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        tensor = tensor.contiguous()
        out = torch.empty((self.world_size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype,
                          device=tensor.device)
        dist.all_gather_into_tensor(out, tensor, group=self._g())
        if dim == 0:
            return out
        return torch.cat(out.chunk(self.world_size, dim=0), dim=dim)

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
