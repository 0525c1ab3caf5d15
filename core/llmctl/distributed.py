"""A ``Communicator`` on ``torch.distributed`` that any platform plugin can instantiate or subclass.

Most backends differ only in the process-group backend name ("gloo", "nccl", "xccl", ...) and in how a rank
binds to its device, so those are the two seams (``backend_name`` and ``prepare_device``); the rules for
owning process groups live here once:

* World size 1 never touches torch.distributed: every collective is the identity, so a single-process engine
  creates no global process group that a later ``init_process_group`` (by the user or a test) would hit.
* With more ranks it owns the default group only if it created it; when something else (torchrun, Ray, the
  user) already initialised torch.distributed with the same world, it builds a private group on that world.
* Sub-groups (``new_group``: the tensor-parallel group of each pipeline stage) number their ranks within the
  group, so ``send``, ``recv`` and ``broadcast`` pass torch the group's ranks (``group_dst``/``group_src``).
* ``all_to_all`` (expert parallelism's dispatch and combine) is ``all_to_all_single`` with uneven splits, which
  NCCL and gloo (for CPU tensors) implement; ``all_to_all`` of a list is not used because gloo requires every
  part to have the same shape there. A backend that refuses ``all_to_all_single`` gets point-to-point pairs.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import torch
import torch.distributed as dist

from llmctl.plugins.types import Communicator


class TorchDistributedCommunicator(Communicator):
    def __init__(self, name: str, platform: str, backend: str = "gloo", timeout_s: float = 300.0) -> None:
        self.name = name
        self.platform = platform
        self.backend = backend
        self.timeout_s = timeout_s
        self.rank = 0
        self.world_size = 1
        self._group: dist.ProcessGroup | None = None
        self._device: torch.device | None = None
        self._owns_default = False
        self._active = False
        self._a2a_single = True  # False once the backend refused all_to_all_single: point-to-point pairs then

    # -- seams for subclasses ----------------------------------------------------------------------------------
    def backend_name(self) -> str:
        """The torch.distributed backend to create groups with (resolved at ``init``, after device checks)."""
        return self.backend

    def prepare_device(self, rank: int) -> torch.device | None:
        """Bind this rank to its device before the group exists; return it when the backend wants ``device_id``
        (NCCL binds eagerly then, avoiding a lazy-init hang) and for device-aware barriers."""
        return None

    # -- the contract ------------------------------------------------------------------------------------------
    def init(self, rank: int, world_size: int, init_method: str) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if self._active:
            raise RuntimeError(f"communicator {self.name!r} is already initialised; call destroy() first")
        self.rank, self.world_size = rank, world_size
        self._active = True
        if world_size == 1:
            return
        self._device = self.prepare_device(rank)
        backend = self.backend_name()
        timeout = timedelta(seconds=self.timeout_s)
        if dist.is_initialized():
            if dist.get_world_size() != world_size or dist.get_rank() != rank:
                raise RuntimeError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                                   f"{dist.get_world_size()}, not rank {rank} of {world_size}")
            self._group = dist.new_group(ranks=list(range(world_size)), backend=backend, timeout=timeout)
        else:
            kwargs = {"device_id": self._device} if self._device is not None else {}
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=timeout, **kwargs)
            self._owns_default = True
            self._group = dist.group.WORLD

    def new_group(self, ranks: list[int]) -> TorchDistributedCommunicator:
        """``dist.new_group`` over ``ranks`` of this group, which every rank of this group enters (torch's rule).
        A rank outside ``ranks`` gets an inactive communicator."""
        if not self._active or self.world_size == 1:
            raise RuntimeError(f"communicator {self.name!r}: new_group needs an initialised group of several ranks")
        if sorted(set(ranks)) != sorted(ranks) or not all(0 <= r < self.world_size for r in ranks):
            raise ValueError(f"new_group: ranks {ranks} must be distinct ranks below world_size {self.world_size}")
        ranks = sorted(ranks)  # torch numbers a group's ranks in increasing order
        global_ranks = [dist.get_global_rank(self._group, r) for r in ranks] \
            if self._group is not dist.group.WORLD else list(ranks)
        group = dist.new_group(ranks=global_ranks, backend=self.backend_name(),
                               timeout=timedelta(seconds=self.timeout_s))
        sub = copy.copy(self)
        sub._owns_default = False
        sub._group = group
        sub.world_size = len(ranks)
        sub.rank = ranks.index(self.rank) if self.rank in ranks else -1
        sub._active = self.rank in ranks
        return sub

    def _has_peers(self) -> bool:
        if not self._active:
            raise RuntimeError(f"communicator {self.name!r} used before init()")
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self._has_peers():
            return tensor
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self._group)
        return tensor if buf is tensor else tensor.copy_(buf)

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if not self._has_peers():
            return tensor
        src = tensor.contiguous()
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        dist.all_gather(parts, src, group=self._group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if not self._has_peers():
            return tensor
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.broadcast(buf, group=self._group, group_src=src)
        return tensor if buf is tensor else tensor.copy_(buf)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        if not self._has_peers():
            raise ValueError("send needs a peer; world_size is 1")
        dist.send(tensor.contiguous(), group=self._group, group_dst=dst)

    def isend(self, tensor: torch.Tensor, dst: int) -> dist.Work:
        if not self._has_peers():
            raise ValueError("isend needs a peer; world_size is 1")
        return dist.isend(tensor.contiguous(), group=self._group, group_dst=dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if not self._has_peers():
            raise ValueError("recv needs a peer; world_size is 1")
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.recv(buf, group=self._group, group_src=src)
        return tensor if buf is tensor else tensor.copy_(buf)

    def all_to_all(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        if len(send_counts) != self.world_size or len(recv_counts) != self.world_size:
            raise ValueError(f"all_to_all: send_counts {send_counts} and recv_counts {recv_counts} need one count "
                             f"per rank ({self.world_size})")
        if sum(send_counts) != tensor.shape[0]:
            raise ValueError(f"all_to_all: send_counts add up to {sum(send_counts)}, the tensor has "
                             f"{tensor.shape[0]} rows")
        src = tensor.contiguous()
        out = src.new_empty((sum(recv_counts), *src.shape[1:]))
        if not self._has_peers():
            return out.copy_(src)
        if self._a2a_single:
            try:
                dist.all_to_all_single(out, src, output_split_sizes=list(recv_counts),
                                       input_split_sizes=list(send_counts), group=self._group)
                return out
            except RuntimeError as exc:  # raised on every rank alike, before anything is exchanged
                if "support" not in str(exc) and "implemented" not in str(exc):
                    raise
                self._a2a_single = False
        return self._all_to_all_pairs(src, out, send_counts, recv_counts)

    def _all_to_all_pairs(self, src: torch.Tensor, out: torch.Tensor, send_counts: list[int],
                          recv_counts: list[int]) -> torch.Tensor:
        """One isend/irecv per peer with rows to exchange, all in flight together (``batch_isend_irecv``), so no
        pair of ranks waits on the other's order; a rank's rows to itself are copied."""
        send_at = [sum(send_counts[:j]) for j in range(self.world_size)]
        recv_at = [sum(recv_counts[:i]) for i in range(self.world_size)]
        ops = []
        for peer in range(self.world_size):
            if peer == self.rank:
                out.narrow(0, recv_at[peer], recv_counts[peer]).copy_(
                    src.narrow(0, send_at[peer], send_counts[peer]))
                continue
            dst = peer if self._group is dist.group.WORLD else dist.get_global_rank(self._group, peer)
            if send_counts[peer]:
                ops.append(dist.P2POp(dist.isend, src.narrow(0, send_at[peer], send_counts[peer]), dst, self._group))
            if recv_counts[peer]:
                ops.append(dist.P2POp(dist.irecv, out.narrow(0, recv_at[peer], recv_counts[peer]), dst, self._group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return out

    def barrier(self) -> None:
        if not self._has_peers():
            return
        if self._device is not None and self._device.type == "cuda":
            dist.barrier(group=self._group, device_ids=[self._device.index])
        else:
            dist.barrier(group=self._group)

    def destroy(self) -> None:
        if self._active and self.world_size > 1 and dist.is_initialized():
            if self._owns_default:
                dist.destroy_process_group()
            elif self._group is not None:
                dist.destroy_process_group(self._group)
        self._group, self._owns_default, self._active = None, False, False
