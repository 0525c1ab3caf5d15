"""Expert parallelism's placement, dispatch and combine, in one process (its start-up refusals and the gloo ranks
are in tests/test_tensor_parallel_families.py, next to the checkpoints they use).

The ranks here are threads over an in-memory communicator, so both ways of reaching the experts (the all-to-all
dispatch and the all-reduce) run for several rank counts and batch sizes, including chunks with no tokens, at the
cost of a few milliseconds.
"""

from __future__ import annotations

import threading

import pytest
import torch
from llmctl.expert_parallel import dispatch_combine, dispatch_combine_across, expert_placement, local_all_reduce
from llmctl.ops import reference
from llmctl.plugins.types import Communicator
from llmctl.tensor_parallel import TensorParallelGroup


class _Exchange:
    """What the ranks' threads share: each deposits a value, all wait, each reads everyone's."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list = [None] * size

    def swap(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        return got


class _ThreadCommunicator(Communicator):
    name = "threads"

    def __init__(self, exchange: _Exchange, rank: int, size: int) -> None:
        self.x, self.rank, self.world_size = exchange, rank, size
        self.calls: list[str] = []

    def init(self, rank: int, world_size: int, init_method: str) -> None:
        raise AssertionError("already initialised")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append("all_reduce")
        return torch.stack(self.x.swap(self.rank, tensor.clone())).sum(0)

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        self.calls.append("all_gather")
        return torch.cat(self.x.swap(self.rank, tensor.clone()), dim=dim)

    def all_to_all(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        self.calls.append("all_to_all")
        parts = self.x.swap(self.rank, list(tensor.split(send_counts)))
        got = [parts[src][self.rank] for src in range(self.world_size)]
        assert [g.shape[0] for g in got] == recv_counts, "recv_counts disagree with what the peers sent"
        return torch.cat(got)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        raise NotImplementedError

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        raise NotImplementedError

    def barrier(self) -> None:
        self.x.barrier.wait()


def _run_ranks(size: int, fn):
    exchange, results, errors = _Exchange(size), [None] * size, []

    def one(rank: int) -> None:
        try:
            comm = _ThreadCommunicator(exchange, rank, size)
            results[rank] = (fn(rank, TensorParallelGroup(rank, size, comm)), comm.calls)
        except BaseException as exc:  # noqa: BLE001 - reported below, with the barrier broken for the others
            errors.append(exc)
            exchange.barrier.abort()

    threads = [threading.Thread(target=one, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("path", [dispatch_combine, local_all_reduce], ids=["all_to_all", "all_reduce"])
@pytest.mark.parametrize("size,tokens", [(2, 5), (2, 1), (4, 7), (4, 2)])
def test_each_rank_gets_every_tokens_experts_output(path, size, tokens):
    """Each rank, holding only its experts, ends with the output of the single-rank fused_moe for every token;
    the all-to-all path dispatches and combines (two all_to_all, one all_gather), the other sums once."""
    e, k, h, inter = 8, 3, 6, 4
    gen = torch.Generator().manual_seed(size * 100 + tokens)
    hidden = torch.randn(tokens, h, generator=gen)
    w13, w2 = torch.randn(e, 2 * inter, h, generator=gen), torch.randn(e, h, inter, generator=gen)
    weights, ids = torch.topk(torch.randn(tokens, e, generator=gen).softmax(-1), k, dim=-1)
    want = reference.fused_moe(hidden, w13, w2, weights, ids)

    def rank_fn(rank: int, group: TensorParallelGroup) -> torch.Tensor:
        place = expert_placement(e, size, rank)
        own = slice(place.first, place.first + place.count)

        def run(rows, w, local_ids):
            assert bool((local_ids >= 0).all() and (local_ids < place.count).all())
            return reference.fused_moe(rows, w13[own], w2[own], w, local_ids)

        return path(hidden, weights, ids, place, group, run)

    for got, calls in _run_ranks(size, rank_fn):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert calls == (["all_to_all", "all_to_all", "all_gather"] if path is dispatch_combine
                         else ["all_reduce"])


def test_placement_is_contiguous_and_refuses_an_uneven_split():
    assert [(p.first, p.count) for p in (expert_placement(8, 4, r) for r in range(4))] == \
        [(0, 2), (2, 2), (4, 2), (6, 2)]
    with pytest.raises(ValueError, match=r"enable_expert_parallel: num_experts=6 does not split over the 4 ranks "
                                         r"of tensor_parallel_size=4"):
        expert_placement(6, 4, 0)


@pytest.mark.parametrize("dp,tp,tokens,dtype", [(2, 1, (5, 0), torch.float32), (2, 1, (1, 6), torch.float32),
                                                (2, 2, (7, 2), torch.float32), (4, 1, (3, 0, 9, 1), torch.float32),
                                                (2, 2, (3, 5), torch.bfloat16)])
def test_across_replicas_each_replica_gets_its_tokens_experts_output(dp, tp, tokens, dtype):
    """Data-parallel replicas (``tokens[d]`` tokens on replica ``d``, none on an idle one) sharing experts over
    all dp x tp ranks: after the count all_gather and the two variable-size all_to_alls each rank holds its own
    replica's single-rank fused_moe output, though no rank's send and receive counts match its peers'. In bf16 the
    rows, weights and expert ids travel as bytes and come back whole."""
    e, k, h, inter = 8, 2, 6, 4
    gen = torch.Generator().manual_seed(dp * 100 + tp * 10 + sum(tokens))
    w13 = torch.randn(e, 2 * inter, h, generator=gen).to(dtype)
    w2 = torch.randn(e, h, inter, generator=gen).to(dtype)
    batches = []
    for t in tokens:
        hidden = torch.randn(t, h, generator=gen).to(dtype)
        weights, ids = torch.topk(torch.randn(t, e, generator=gen).softmax(-1), k, dim=-1)
        weights = weights.to(dtype)
        batches.append((hidden, weights, ids, reference.fused_moe(hidden, w13, w2, weights, ids)))
    size = dp * tp
    ep_x, tp_x = _Exchange(size), [_Exchange(tp) for _ in range(dp)]
    results, errors = [None] * size, []

    def one(rank: int) -> None:
        try:
            d, r = divmod(rank, tp)
            ep = TensorParallelGroup(rank, size, _ThreadCommunicator(ep_x, rank, size))
            group = TensorParallelGroup(r, tp, _ThreadCommunicator(tp_x[d], r, tp))
            place = expert_placement(e, size, rank, dp)
            own = slice(place.first, place.first + place.count)
            hidden, weights, ids, _ = batches[d]
            results[rank] = dispatch_combine_across(
                hidden, weights, ids, place, ep, group,
                lambda rows, w, local: reference.fused_moe(rows, w13[own], w2[own], w, local))
        except BaseException as exc:  # noqa: BLE001 - reported below, with the barriers broken for the others
            errors.append(exc)
            for x in (ep_x, *tp_x):
                x.barrier.abort()

    threads = [threading.Thread(target=one, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for rank, got in enumerate(results):
        torch.testing.assert_close(got, batches[rank // tp][3], atol=1e-5, rtol=1e-5)  # bf16: the same bits


def test_placement_across_replicas_names_both_sizes():
    assert [(p.first, p.count) for p in (expert_placement(8, 4, r, 2) for r in range(4))] == \
        [(0, 2), (2, 2), (4, 2), (6, 2)]
    with pytest.raises(ValueError, match=r"enable_expert_parallel: num_experts=6 does not split over the 4 ranks "
                                         r"of data_parallel_size=2 x tensor_parallel_size=2"):
        expert_placement(6, 4, 0, 2)
