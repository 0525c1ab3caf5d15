"""The tensor-parallel group of one engine rank: which slice of the model it holds, and the platform's
communicator that sums and gathers the slices.

Layers only ever see a :class:`TensorParallelGroup`; at size 1 every collective is the identity and no
communicator is touched, so a single-device engine runs exactly the code it ran before tensor parallelism.
How the ranks come to exist (a launcher such as torchrun, or the engine's own worker processes) is the
executor's business; this module only turns "rank r of n" into a group and checks that the model can be split.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from llmctl.plugins.types import Communicator

logger = logging.getLogger(__name__)

EXECUTOR_BACKENDS = ("mp", "external_launcher", "uni", "ray")


@dataclass
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    communicator: Communicator | None = None
    # Sub-groups made from this one's communicator (a pipeline stage's tensor-parallel group, a column of
    # stages), released before it.
    children: list[Communicator] = field(default_factory=list)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        assert self.communicator is not None
        return self.communicator.all_reduce(tensor)

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if self.size == 1:
            return tensor
        assert self.communicator is not None
        return self.communicator.all_gather(tensor, dim=dim)

    def destroy(self) -> None:
        for child in self.children:
            child.destroy()
        self.children = []
        if self.communicator is not None:
            self.communicator.destroy()
            self.communicator = None


SINGLE = TensorParallelGroup()


@dataclass(frozen=True)
class RankLayout:
    """Where each rank of a replica sits when tensor and pipeline parallelism combine, as vLLM lays them out:
    rank ``r`` is tensor-parallel rank ``r % tp`` of stage ``r // tp``. A stage's ranks are consecutive (on one
    machine they share the fast links the all-reduces need); the ranks of one tensor-parallel index across the
    stages form a pipeline, which passes that index's copy of the activations from stage to stage."""

    tp: int
    pp: int

    def coords(self, rank: int) -> tuple[int, int]:
        """(stage, tensor-parallel rank) of ``rank``."""
        return divmod(rank, self.tp)

    def stage_ranks(self, stage: int) -> list[int]:
        """The tensor-parallel group of ``stage``."""
        return [stage * self.tp + i for i in range(self.tp)]

    def pipeline_ranks(self, tp_rank: int) -> list[int]:
        """The pipeline of tensor-parallel rank ``tp_rank``: its rank in each stage, first stage first."""
        return [s * self.tp + tp_rank for s in range(self.pp)]


@dataclass(frozen=True)
class DataParallelAddress:
    """A replica's place among ``data_parallel_size`` replicas whose ranks form one expert-parallel group (found
    through ``init_method``); only set when the replicas share their experts (``llmctl.expert_parallel``)."""

    rank: int
    size: int
    init_method: str


@dataclass(frozen=True)
class RankAddress:
    """Where this process sits in the group and how its ranks find each other (a torch.distributed init method)."""

    rank: int
    world_size: int
    init_method: str
    local_rank: int = 0
    data_parallel: DataParallelAddress | None = None


def launcher_address(world_size: int) -> RankAddress:
    """The rank a launcher (torchrun, a test, a job scheduler) gave this process, from the usual environment:
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"distributed_executor_backend: 'external_launcher' expects each rank to be started by a "
                         f"launcher such as torchrun, which sets {', '.join(missing)} (missing here)")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise ValueError(f"distributed_executor_backend: RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from None
    if world != world_size:
        raise ValueError(f"tensor_parallel_size: {world_size} differs from the launcher's WORLD_SIZE={world}; "
                         f"start as many ranks as tensor_parallel_size")
    return RankAddress(rank, world, "env://", local)


def split_evenly(total: int, size: int, what: str) -> int:
    """``total / size``, or a ``ValueError`` naming ``tensor_parallel_size`` and the dimension that does not split."""
    if total % size:
        raise ValueError(f"tensor_parallel_size: {size} does not divide {what}={total}; choose a size that does")
    return total // size


def kv_head_slice(num_kv_heads: int, size: int, rank: int) -> tuple[int, int]:
    """(first KV head, KV heads on this rank). With fewer KV heads than ranks each rank keeps one KV head,
    shared by the ``size // num_kv_heads`` ranks whose query heads use it (it is replicated, not split)."""
    if num_kv_heads >= size:
        per = split_evenly(num_kv_heads, size, "num_key_value_heads")
        return rank * per, per
    if size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size: {size} is neither a divisor nor a multiple of "
                         f"num_key_value_heads={num_kv_heads}, so KV heads can be neither split nor replicated")
    return rank // (size // num_kv_heads), 1


def vocab_slice(vocab_size: int, size: int, rank: int) -> tuple[int, int, int]:
    """(first row, rows per rank, rows of the real vocabulary on this rank). Every rank holds the same number of
    rows so the logits gather into one tensor; the last ranks' surplus rows are zero and cut after the gather."""
    per = -(-vocab_size // size)
    start = rank * per
    return start, per, max(0, min(per, vocab_size - start))


def check_splittable(hf_config: Any, size: int) -> None:
    """Refuse at start-up, naming the setting, a model whose heads or MLP width do not split over ``size``."""
    if size == 1:
        return
    cfg = getattr(hf_config, "text_config", None) or hf_config
    heads = cfg.num_attention_heads
    split_evenly(heads, size, "num_attention_heads")
    kv_head_slice(getattr(cfg, "num_key_value_heads", None) or heads, size, 0)
    split_evenly(cfg.intermediate_size, size, "intermediate_size")


def init_group(address: RankAddress, communicator: Communicator | None, platform: str) -> TensorParallelGroup:
    """A group for ``address`` on a private copy of the platform's registered communicator (the registered
    object is shared by every engine in the process and must stay uninitialised)."""
    if address.world_size == 1:
        return TensorParallelGroup()
    if communicator is None:
        raise ValueError(f"tensor_parallel_size: platform {platform} registers no communicator, so it cannot run "
                         f"{address.world_size} ranks")
    comm = copy.copy(communicator)
    comm.init(address.rank, address.world_size, address.init_method)
    logger.info("tensor parallel: rank %d of %d on communicator %s", address.rank, address.world_size, comm.name)
    return TensorParallelGroup(address.rank, address.world_size, comm)


def agree_min(group: TensorParallelGroup, value: int) -> int:
    """The smallest ``value`` over the ranks: quantities each rank measures for itself (free memory, hence KV
    blocks) must be equal everywhere, or the ranks' schedulers would take different decisions."""
    if group.size == 1:
        return value
    gathered = group.all_gather(torch.tensor([value], dtype=torch.int64))
    return int(gathered.min())


def check_same_model(group: TensorParallelGroup, description: str) -> None:
    """Fail start-up when ranks were started with different models or settings (a launcher misconfigured),
    instead of running mismatched shards that return garbage."""
    if group.size == 1:
        return
    digest = int.from_bytes(hashlib.sha256(description.encode()).digest()[:7], "little")
    gathered = group.all_gather(torch.tensor([digest], dtype=torch.int64))
    if len(set(gathered.tolist())) != 1:
        raise ValueError(f"tensor_parallel_size: ranks disagree about the model or engine settings (rank "
                         f"{group.rank} has {description}); start every rank with the same arguments")


@dataclass
class PipelineStage:
    """This rank's stage of a pipeline-parallel model: a contiguous run of decoder layers. Activations (hidden
    states and the residual) go to the next stage by ``send``/``recv``; the last stage's logits are broadcast so
    every rank samples the same token and the ranks stay in lockstep."""

    rank: int = 0
    size: int = 1
    communicator: Communicator | None = None
    # While a list (pipeline micro-batches in flight, engine/batch_queue.py): sends are started without waiting,
    # their handles kept here, so this stage computes the next batch while the next stage takes this one.
    pending_sends: list[Any] | None = None

    @property
    def can_send_async(self) -> bool:
        """Whether the communicator has a non-blocking send (``Communicator.isend``)."""
        comm = self.communicator
        return comm is not None and type(comm).isend is not Communicator.isend

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """[start, end) of this stage's layers: an even split, the first stages taking one more when it does not
        divide."""
        per, extra = divmod(num_layers, self.size)
        start = self.rank * per + min(self.rank, extra)
        return start, start + per + (1 if self.rank < extra else 0)

    def send_next(self, *tensors: torch.Tensor) -> None:
        assert self.communicator is not None
        for t in tensors:
            if self.pending_sends is None:
                self.communicator.send(t, dst=self.rank + 1)
            else:
                self.pending_sends.append(self.communicator.isend(t, dst=self.rank + 1))

    def recv_prev(self, *buffers: torch.Tensor) -> tuple[torch.Tensor, ...]:
        assert self.communicator is not None
        return tuple(self.communicator.recv(b, src=self.rank - 1) for b in buffers)

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        assert self.communicator is not None
        return self.communicator.broadcast(tensor, src=self.size - 1)


def split_world(world: TensorParallelGroup, tp: int, pp: int) -> tuple[TensorParallelGroup, PipelineStage]:
    """This rank's tensor-parallel group and pipeline stage within ``world`` (``tp * pp`` ranks). With only one
    kind of parallelism the world is that group; with both, sub-groups of the world's communicator are made
    (every rank creates every group, in the same order, as torch.distributed requires) and the world keeps
    them so that destroying it releases them too."""
    if world.size != tp * pp:
        raise ValueError(f"tensor_parallel_size: {tp} x pipeline_parallel_size {pp} ranks, but the group has "
                         f"{world.size}")
    if pp == 1:
        return world, PipelineStage()
    if tp == 1:
        return TensorParallelGroup(), PipelineStage(world.rank, world.size, world.communicator)
    assert world.communicator is not None
    layout = RankLayout(tp, pp)
    stage, tp_rank = layout.coords(world.rank)
    try:
        stage_comms = [world.communicator.new_group(layout.stage_ranks(s)) for s in range(pp)]
        pipe_comms = [world.communicator.new_group(layout.pipeline_ranks(i)) for i in range(tp)]
    except NotImplementedError as exc:
        raise ValueError(f"pipeline_parallel_size: {pp} stages of tensor_parallel_size={tp} ranks need sub-groups "
                         f"of the platform's communicator ({exc}); use one of the two") from None
    world.children = [c for i, c in enumerate(stage_comms) if i != stage] + \
        [c for i, c in enumerate(pipe_comms) if i != tp_rank] + [stage_comms[stage], pipe_comms[tp_rank]]
    logger.info("parallel layout: rank %d is tensor-parallel rank %d of stage %d (stage ranks %s, pipeline ranks "
                "%s)", world.rank, tp_rank, stage, layout.stage_ranks(stage), layout.pipeline_ranks(tp_rank))
    return (TensorParallelGroup(tp_rank, tp, stage_comms[stage]),
            PipelineStage(stage, pp, pipe_comms[tp_rank]))


def check_pipeline_splittable(hf_config: Any, size: int) -> None:
    if size == 1:
        return
    cfg = getattr(hf_config, "text_config", None) or hf_config
    if cfg.num_hidden_layers < size:
        raise ValueError(f"pipeline_parallel_size: {size} stages need at least as many layers, the model has "
                         f"num_hidden_layers={cfg.num_hidden_layers}")
