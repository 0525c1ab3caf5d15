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

The send and receive counts are computed, not exchanged: the router is replicated, so every rank derives the same
``n x n`` table of pairs from chunk ``s`` to owner ``d``. With data parallelism (different tokens per rank) the
counts would have to travel first; that is not wired up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmctl.plugins.types import Communicator
from llmctl.tensor_parallel import TensorParallelGroup

logger = logging.getLogger(__name__)

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


def expert_placement(num_experts: int, size: int, rank: int) -> ExpertPlacement:
    if num_experts % size:
        raise ValueError(f"enable_expert_parallel: num_experts={num_experts} does not split over the "
                         f"{size} ranks of tensor_parallel_size={size}; choose a tensor_parallel_size that divides "
                         f"it, or leave enable_expert_parallel off (every expert split by its columns)")
    per = num_experts // size
    return ExpertPlacement(rank, size, num_experts, rank * per, per)


def check_expert_parallel(hf_config: Any, model_cls: Any, tp_size: int, quant: Any) -> bool:
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
    if tp_size == 1:
        logger.info("enable_expert_parallel: one rank holds all %d experts (tensor_parallel_size=1)", num_experts)
        return True
    expert_placement(num_experts, tp_size, 0)
    return True


def has_all_to_all(communicator: Communicator | None) -> bool:
    return communicator is not None and type(communicator).all_to_all is not Communicator.all_to_all


def expert_parallel_mode() -> str:
    """"all_to_all" unless ``LLMCTL_EP_ALL2ALL=0`` asks for the all-reduce (to compare the two); part of what the
    ranks compare at start-up, since ranks that combine differently would wait on different collectives."""
    return "all_reduce" if os.environ.get("LLMCTL_EP_ALL2ALL", "1") == "0" else "all_to_all"


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
