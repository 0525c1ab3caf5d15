"""``gloo``: tensor-parallel collectives for CPU processes over torch.distributed's gloo backend.

World size 1 never touches torch.distributed: every collective is the identity, so a single-process engine
does not create a global process group that a later ``init_process_group`` (by the user, or a test) would
collide with. With more ranks it owns the default group only if it created it; when something else already
initialised torch.distributed it builds a private gloo group instead and leaves the default one alone.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from llmctl.plugins.types import Communicator


class GlooCommunicator(Communicator):
    name = "gloo"
    platform = "cpu"

    def __init__(self, timeout_s: float = 300.0) -> None:
        self.timeout_s = timeout_s
        self.rank = 0
        self.world_size = 1
        self._group: dist.ProcessGroup | None = None
        self._owns_default = False
        self._active = False

    def init(self, rank: int, world_size: int, init_method: str) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if self._active:
            raise RuntimeError("gloo communicator is already initialised; call destroy() first")
        self.rank, self.world_size = rank, world_size
        self._active = True
        if world_size == 1:
            return
        timeout = timedelta(seconds=self.timeout_s)
        if dist.is_initialized():
            if dist.get_world_size() != world_size or dist.get_rank() != rank:
                raise RuntimeError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                                   f"{dist.get_world_size()}, not rank {rank} of {world_size}")
            self._group = dist.new_group(ranks=list(range(world_size)), backend="gloo", timeout=timeout)
        else:
            dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=timeout)
            self._owns_default = True
            self._group = dist.group.WORLD

    def _check(self) -> bool:
        """True when there are peers to talk to."""
        if not self._active:
            raise RuntimeError("gloo communicator used before init()")
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self._check():
            return tensor
        if tensor.is_contiguous():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._group)
            return tensor
        buf = tensor.contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self._group)
        return tensor.copy_(buf)

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if not self._check():
            return tensor
        src = tensor.contiguous()
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        dist.all_gather(parts, src, group=self._group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if not self._check():
            return tensor
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.broadcast(buf, src=src, group=self._group)
        return tensor if buf is tensor else tensor.copy_(buf)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        if not self._check():
            raise ValueError("send needs a peer; world_size is 1")
        dist.send(tensor.contiguous(), dst=dst, group=self._group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if not self._check():
            raise ValueError("recv needs a peer; world_size is 1")
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.recv(buf, src=src, group=self._group)
        return tensor if buf is tensor else tensor.copy_(buf)

    def barrier(self) -> None:
        if self._check():
            dist.barrier(group=self._group)

    def destroy(self) -> None:
        if self._active and self.world_size > 1 and dist.is_initialized():
            if self._owns_default:
                dist.destroy_process_group()
            elif self._group is not None:
                dist.destroy_process_group(self._group)
        self._group, self._owns_default, self._active = None, False, False
