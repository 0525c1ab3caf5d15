"""Expert parallelism: a mixture-of-experts layer's experts placed whole on the ranks of the tensor-parallel group
(``enable_expert_parallel``, vLLM's name), instead of every rank holding a slice of every expert.

The expert-parallel group is the tensor-parallel group (EP size = ``tensor_parallel_size``, as vLLM has it without
data parallelism). Rank ``r`` of ``n`` holds experts ``[r * E / n, (r + 1) * E / n)``, contiguous as vLLM's default
placement, and reads only those from the checkpoint. The router stays replicated, so every rank knows where every
token goes; attention and the rest of the layer are split as under tensor parallelism, so every rank enters the
MoE layer with every token's hidden state.

Two ways to bring each token to its experts and back, both exact (fp32 gives the tokens of one rank):

* :func:`dispatch_combine` (the communicator has ``all_to_all``): the tokens are shared out, rank ``r`` taking the
  ``r``-th contiguous chunk (as a sequence-parallel MoE does); each rank sends each of its tokens' (token, expert)
  pairs to the rank that owns the expert (``all_to_all``, the dispatch), the owners run their experts on the rows
  they received, send the weighted results back (``all_to_all``, the combine), each rank sums its tokens' results,
  and one ``all_gather`` gives every rank every token again. A row crosses the link only when its expert lives
  elsewhere, and no rank computes for another rank's tokens.
* :func:`local_all_reduce` (a communicator without ``all_to_all``, or ``LLMCTL_EP_ALL2ALL=0``): each rank runs its
  own experts on every token routed to them and one ``all_reduce`` sums the partial outputs, which is what vLLM
  does with expert parallelism inside one tensor-parallel group.

Inside one replica the send and receive counts are computed, not exchanged: the router is replicated, so every
rank derives the same ``n x n`` table of pairs from chunk ``s`` to owner ``d``.

Across data-parallel replicas (``data_parallel_size > 1`` with ``enable_expert_parallel``, as vLLM runs DeepSeek
and Qwen-MoE) the expert-parallel group is every rank of every replica (EP size = DP x TP, EP rank
``dp_rank * TP + tp_rank``): one process group over all of them, made through the platform's communicator, with
each replica's tensor-parallel group a sub-group of it (:func:`init_expert_world`). Attention stays data
parallel: each replica computes its own requests, so the ranks of different replicas enter a MoE layer with
different tokens, and :func:`dispatch_combine_across` exchanges the counts first (one ``all_gather`` of each
rank's per-owner counts) before the variable-size rows, which carry their routing weight and expert id with
them since the owner never saw the router's choice. Every EP rank must enter every MoE layer, so a replica with
no work in a step still runs its MoE layers on no tokens (:func:`idle_moe_step`), serving the other replicas'
tokens on its experts; the data-parallel driver steps every replica whenever any has work, and none when none
has.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmctl.plugins.types import Communicator
from llmctl.tensor_parallel import RankAddress, TensorParallelGroup, init_group

logger = logging.getLogger(__name__)

ALL2ALL_ENV = "LLMCTL_EP_ALL2ALL"

# (rows [N, H], weights [N, 1], local expert ids [N, 1]) -> the rows' weighted expert outputs [N, H]
RunExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertPlacement:
    """This rank's experts: ``count`` contiguous experts from ``first``, of ``num_experts`` over ``size`` ranks."""

    rank: int
    size: int
    num_experts: int
    first: int
    count: int

    def owns(self, expert: int) -> bool:
        return self.first <= expert < self.first + self.count


def expert_placement(num_experts: int, size: int, rank: int, dp_size: int = 1) -> ExpertPlacement:
    """``size`` ranks in all: ``tensor_parallel_size``, times ``dp_size`` across data-parallel replicas."""
    if num_experts % size:
        tp = size // dp_size
        where = f"tensor_parallel_size={tp}" if dp_size == 1 else \
            f"data_parallel_size={dp_size} x tensor_parallel_size={tp}"
        raise ValueError(f"enable_expert_parallel: num_experts={num_experts} does not split over the "
                         f"{size} ranks of {where}; choose sizes whose product divides it, or leave "
                         f"enable_expert_parallel off (every expert split by its columns)")
    per = num_experts // size
    return ExpertPlacement(rank, size, num_experts, rank * per, per)


def check_expert_parallel(hf_config: Any, model_cls: Any, tp_size: int, quant: Any, dp_size: int = 1) -> bool:
    """At start-up, before any peer is waited for: whether the model's MoE layers place their experts per rank.
    A model without experts ignores the setting (as vLLM does), with a log line; an expert count the ranks do not
    divide is refused, naming ``enable_expert_parallel``. A quantized model places its experts like any other:
    the routed experts stay quantized (``llmctl.quantization.moe``), each rank creating, reading and unpacking
    only its own experts' packed weights, scales, zeros and ``g_idx``, whole (no group is cut, so no group size
    constrains the placement), while the linear layers (attention, shared experts, dense MLPs) split as under
    tensor parallelism and are checked there."""
    num_experts_of = getattr(model_cls, "expert_parallel_num_experts", None)
    num_experts = num_experts_of(hf_config) if callable(num_experts_of) else None
    if not num_experts:
        logger.info("enable_expert_parallel: %s has no mixture-of-experts layers; the setting is ignored",
                    getattr(model_cls, "__name__", model_cls))
        return False
    if tp_size * dp_size == 1:
        logger.info("enable_expert_parallel: one rank holds all %d experts (tensor_parallel_size=1)", num_experts)
        return True
    expert_placement(num_experts, tp_size * dp_size, 0, dp_size)
    return True


def check_across_replicas(args: Any, hf_config: Any, model_cls: Any, quant: Any) -> bool:
    """In the data-parallel driver, before any replica starts: whether the replicas share their experts
    (``data_parallel_size > 1``, ``enable_expert_parallel`` and a model with experts). What would break the
    lockstep every MoE layer needs (one forward per step on every replica) is refused, naming the setting."""
    dp = args.data_parallel_size
    if dp == 1 or not args.enable_expert_parallel:
        return False
    if not check_expert_parallel(hf_config, model_cls, args.tensor_parallel_size, quant, dp):
        return False  # no experts: plain replicas, as logged
    refused = (("pipeline_parallel_size", args.pipeline_parallel_size > 1, "stages hold different layers"),
               ("speculative_config", args.speculative_config is not None, "a draft model steps more forwards"),
               (ALL2ALL_ENV, expert_parallel_mode() != "all_to_all",
                "replicas have different tokens, so no all-reduce can combine them"))
    for name, used, why in refused:
        if used:
            raise ValueError(f"{name}: not supported with enable_expert_parallel across data_parallel_size={dp} "
                             f"replicas ({why})")
    return True


def has_all_to_all(communicator: Communicator | None) -> bool:
    return communicator is not None and type(communicator).all_to_all is not Communicator.all_to_all


def expert_parallel_mode() -> str:
    """"all_to_all" unless ``LLMCTL_EP_ALL2ALL=0`` asks for the all-reduce (to compare the two); part of what the
    ranks compare at start-up, since ranks that combine differently would wait on different collectives."""
    return "all_reduce" if os.environ.get(ALL2ALL_ENV, "1") == "0" else "all_to_all"


def use_dispatch(group: TensorParallelGroup) -> bool:
    """The all-to-all dispatch where the communicator has it and the mode asks for it."""
    return has_all_to_all(group.communicator) and expert_parallel_mode() == "all_to_all"


def _empty_out(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.new_zeros((0, hidden.shape[-1]))


def _run(run_experts: RunExperts, rows: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if rows.shape[0] == 0:
        return _empty_out(rows)
    return run_experts(rows, weights.unsqueeze(1), ids.unsqueeze(1))


def local_all_reduce(hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, place: ExpertPlacement,
                     group: TensorParallelGroup, run_experts: RunExperts) -> torch.Tensor:
    """Every token's (token, expert) pairs whose expert is this rank's, through its experts, summed over the
    ranks by one all-reduce."""
    k = ids.shape[1]
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
    mine = ((flat_ids >= place.first) & (flat_ids < place.first + place.count)).nonzero().squeeze(1)
    rows = mine // k
    out = hidden.new_zeros(hidden.shape)
    out.index_add_(0, rows, _run(run_experts, hidden[rows], flat_w[mine], flat_ids[mine] - place.first))
    return group.all_reduce(out)


def dispatch_combine(hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, place: ExpertPlacement,
                     group: TensorParallelGroup, run_experts: RunExperts) -> torch.Tensor:
    """The all-to-all path (module docstring). Pairs are ordered by (token chunk, expert), so a rank's sends are
    grouped by owner in rank order, an owner's receipts arrive chunk by chunk in the order it derives itself, and
    each token's results are added in ascending expert order, the order the single-rank ``fused_moe`` uses."""
    assert group.communicator is not None
    n, r = place.size, place.rank
    t, k = ids.shape
    chunk = -(-t // n)  # tokens per rank; the last ranks' chunks may be short or empty
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
    pair_chunk = torch.arange(t * k, device=ids.device) // k // max(chunk, 1)
    order = torch.argsort(pair_chunk * place.num_experts + flat_ids, stable=True)
    chunk_sorted, owner_sorted = pair_chunk[order], flat_ids[order] // place.count
    table = torch.bincount(chunk_sorted * n + owner_sorted, minlength=n * n).view(n, n).tolist()
    send_counts, recv_counts = table[r], [table[s][r] for s in range(n)]
    sent = order[chunk_sorted == r]  # my chunk's pairs, grouped by owner
    received = order[owner_sorted == r]  # the pairs my experts serve, chunk by chunk
    rows = group.communicator.all_to_all(hidden[sent // k], send_counts, recv_counts)  # dispatch
    done = _run(run_experts, rows, flat_w[received], flat_ids[received] - place.first)
    back = group.communicator.all_to_all(done, recv_counts, send_counts)  # combine
    mine = hidden.new_zeros((chunk, hidden.shape[-1]))
    mine.index_add_(0, sent // k - r * chunk, back)
    return group.all_gather(mine, dim=0)[:t]


# -- across data-parallel replicas ------------------------------------------------------------------------------


def init_expert_world(address: RankAddress, communicator: Communicator | None,
                      platform: str) -> tuple[TensorParallelGroup, TensorParallelGroup]:
    """(the expert-parallel group over every rank of every replica, this replica's own group). The first is one
    process group through the platform's communicator; every replica's group is made from it by every rank, in
    replica order (torch.distributed's rule), and released with it."""
    dp = address.data_parallel
    assert dp is not None
    if not has_all_to_all(communicator):
        raise ValueError(f"enable_expert_parallel: across data_parallel_size={dp.size} replicas tokens travel by "
                         f"all_to_all, which platform {platform} has no communicator for; leave "
                         f"enable_expert_parallel off there")
    world = address.world_size
    ep = init_group(RankAddress(dp.rank * world + address.rank, dp.size * world, dp.init_method,
                                address.local_rank), communicator, platform)
    if world == 1:
        return ep, TensorParallelGroup()
    assert ep.communicator is not None
    mine: Communicator | None = None
    for d in range(dp.size):
        sub = ep.communicator.new_group(list(range(d * world, (d + 1) * world)))
        ep.children.append(sub)
        mine = sub if d == dp.rank else mine
    return ep, TensorParallelGroup(address.rank, world, mine)


def _pack(rows: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each dispatched row with its routing weight and expert id as bytes, so one all_to_all carries all three
    exactly (an id in a bf16 column would not survive past 256 experts)."""
    return torch.cat([rows.contiguous().view(torch.uint8),
                      weights.to(rows.dtype).reshape(-1, 1).contiguous().view(torch.uint8),
                      ids.to(torch.int32).reshape(-1, 1).view(torch.uint8)], dim=1)


def _unpack(packed: torch.Tensor, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    width = hidden * dtype.itemsize

    def part(start: int, end: int, as_dtype: torch.dtype) -> torch.Tensor:
        # a fresh packed copy: a one-row slice counts as contiguous, but its offset and row stride are the packed
        # row's, which a wider dtype may not view
        return packed[:, start:end].clone(memory_format=torch.contiguous_format).view(as_dtype)

    rows = part(0, width, dtype)
    weights = part(width, width + dtype.itemsize, dtype).squeeze(1)
    ids = part(width + dtype.itemsize, packed.shape[1], torch.int32).squeeze(1).long()
    return rows, weights, ids


def dispatch_combine_across(hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                            place: ExpertPlacement, ep: TensorParallelGroup, tp: TensorParallelGroup,
                            run_experts: RunExperts) -> torch.Tensor:
    """The all-to-all path when ranks hold different tokens (module docstring). This replica's tokens are
    shared out over its tensor-parallel ranks as in :func:`dispatch_combine`; each rank's pairs, sorted by expert
    (so grouped by owner in rank order, and each token's results added in ascending expert order as one rank
    does), go to their owners after every rank's per-owner counts are gathered. ``hidden`` may have no rows (an
    idle replica): the rank still takes part, and its experts serve the others."""
    assert ep.communicator is not None
    n, t, k = place.size, ids.shape[0], ids.shape[1]
    chunk = -(-t // tp.size)
    lo = min(tp.rank * chunk, t)
    hi = min(lo + chunk, t)
    flat_ids, flat_w = ids[lo:hi].reshape(-1), weights[lo:hi].reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    counts = torch.bincount(sorted_ids // place.count, minlength=n)
    table = ep.all_gather(counts.view(1, n), dim=0)  # [n, n]: pairs from rank s to owner d
    send_counts, recv_counts = counts.tolist(), table[:, place.rank].tolist()
    local = order // k  # each sent pair's token, within this rank's chunk
    packed = ep.communicator.all_to_all(_pack(hidden[lo + local], flat_w[order], sorted_ids),
                                        send_counts, recv_counts)  # dispatch
    rows, row_weights, row_ids = _unpack(packed, hidden.shape[-1], hidden.dtype)
    done = _run(run_experts, rows, row_weights, row_ids - place.first)
    back = ep.communicator.all_to_all(done, recv_counts, send_counts)  # combine
    mine = hidden.new_zeros((chunk, hidden.shape[-1]))
    mine.index_add_(0, local, back)
    if tp.size == 1 or t == 0:  # a replica's ranks agree on t: none of them gathers an empty batch
        return mine[:t]
    return tp.all_gather(mine, dim=0)[:t]


def idle_moe_step(model: torch.nn.Module) -> int:
    """A replica with no work this step: every MoE layer, in the model's order, takes part in its exchange with
    no tokens of its own (vLLM runs a dummy batch for the same reason). Returns how many layers did."""
    layers = [m for m in model.modules() if callable(getattr(m, "forward_idle", None))]
    with torch.inference_mode():
        for layer in layers:
            layer.forward_idle()
    return len(layers)
