"""One rank of the communicator contract check, run as its own process:

    python -m llmctl_testkit.comm_worker --platform NAME --rank R --world-size W --init-method tcp://HOST:PORT

Separate processes because collectives need them, and because a process group is process-global state that
must not leak into the pytest process. Exit status 0 means every clause held; otherwise the first broken
clause is printed to stderr as ``[communicator.<op>] ...`` and the status is 1 (2: could not even start).
"""

from __future__ import annotations

import argparse
import sys

import torch
from llmctl.plugins.types import Communicator

from llmctl_testkit.harness import ContractViolation, assert_close, load_plugin_manager, require


def run_checks(platform_name: str, rank: int, world_size: int, init_method: str, extra: list[str]) -> None:
    manager = load_plugin_manager(extra)
    platform = manager.registry.platforms[platform_name].item
    comm = manager.registry.communicator_for(platform_name)
    require(comm is not None, "communicator.registered", f"platform {platform_name!r} registers no communicator")
    device = platform.torch_device(0 if platform.device_type == "cpu" else rank)
    dtype = torch.float32
    try:
        comm.init(rank, world_size, init_method)
    except Exception as exc:
        raise ContractViolation("communicator.init", f"{comm.name}.init raised {type(exc).__name__}: {exc}") from exc

    def base(shape: tuple[int, ...], seed: int) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

    # all_reduce: rank r contributes (r + 1) * x; the sum is x * W(W+1)/2 on every rank.
    x = base((5, 7), 1)
    got = comm.all_reduce((x * (rank + 1)).to(device))
    require(isinstance(got, torch.Tensor), "communicator.all_reduce", "must return the reduced tensor")
    assert_close("communicator.all_reduce", got, x * (world_size * (world_size + 1) / 2), dtype,
                 f"rank {rank}/{world_size}")

    for dim in (0, 1):
        parts = [base((3, 4), 10 + r) for r in range(world_size)]
        got = comm.all_gather(parts[rank].to(device), dim=dim)
        assert_close("communicator.all_gather", got, torch.cat(parts, dim=dim), dtype,
                     f"dim={dim}, rank {rank}/{world_size}")

    for src in range(world_size):
        mine = base((6,), 20 + rank)
        got = comm.broadcast(mine.to(device), src=src)
        assert_close("communicator.broadcast", got, base((6,), 20 + src), dtype, f"src={src}, rank {rank}")

    if world_size > 1:
        payload = base((4, 2), 30)
        if rank == 0:
            comm.send(payload.to(device), dst=1)
        elif rank == 1:
            got = comm.recv(torch.zeros(4, 2, device=device), src=0)
            assert_close("communicator.send_recv", got, payload, dtype, "rank 1 receiving from rank 0")
        if type(comm).isend is not Communicator.isend:  # optional: pipeline micro-batches in flight need it
            check_isend(comm, rank, device, dtype)

    if world_size > 1 and type(comm).new_group is not Communicator.new_group:  # optional: tp with pp needs it
        check_sub_groups(comm, rank, world_size, device, dtype)

    if type(comm).all_to_all is not Communicator.all_to_all:  # optional: expert parallelism's dispatch needs it
        check_all_to_all(comm, rank, world_size, device, dtype)

    try:
        comm.barrier()
        comm.destroy()
        comm.destroy()  # the contract says twice is safe
    except Exception as exc:
        raise ContractViolation("communicator.destroy", f"barrier/destroy raised {type(exc).__name__}: {exc}") from exc


def check_isend(comm: Communicator, rank: int, device: torch.device, dtype: torch.dtype) -> None:
    """``isend`` returns before the peer receives: rank 0 starts two sends and only then takes part in a
    broadcast, which rank 1 enters before receiving them (a blocking send would wait forever); the messages
    arrive in the order they were sent."""
    gen = torch.Generator().manual_seed(40)
    first, second = torch.randn(3, 2, generator=gen), torch.randn(5, generator=gen)
    if rank == 0:
        works = [comm.isend(first.to(device), dst=1), comm.isend(second.to(device), dst=1)]
        comm.broadcast(torch.ones(2).to(device), src=0)
        for work in works:
            work.wait()
    else:
        comm.broadcast(torch.zeros(2).to(device), src=0)
        if rank == 1:
            got = (comm.recv(torch.zeros(3, 2, device=device), src=0), comm.recv(torch.zeros(5, device=device), src=0))
            assert_close("communicator.isend", got[0], first, dtype, "the first message, rank 1")
            assert_close("communicator.isend", got[1], second, dtype, "the second message, rank 1")


def check_sub_groups(comm: Communicator, rank: int, world_size: int, device: torch.device,
                     dtype: torch.dtype) -> None:
    """``new_group``: a group of every rank behaves like the world, numbering ranks within the group; a group of
    one rank is its own identity; every rank creates every group, in the same order."""
    try:
        whole = comm.new_group(list(range(world_size)))
        alone = [comm.new_group([r]) for r in range(world_size)]
    except Exception as exc:
        raise ContractViolation("communicator.new_group", f"{comm.name}.new_group raised {type(exc).__name__}: "
                                                          f"{exc}") from exc
    x = torch.arange(6, dtype=dtype).reshape(2, 3)
    assert_close("communicator.new_group", whole.all_reduce((x * (rank + 1)).to(device)),
                 x * (world_size * (world_size + 1) / 2), dtype, f"all_reduce over every rank, rank {rank}")
    last = world_size - 1
    got = whole.broadcast(torch.full((3,), float(rank)).to(device), src=last)
    assert_close("communicator.new_group", got, torch.full((3,), float(last)), dtype, f"broadcast, rank {rank}")
    if rank == last:
        whole.send(x.to(device), dst=0)
    elif rank == 0:
        assert_close("communicator.new_group", whole.recv(torch.zeros(2, 3, device=device), src=last), x, dtype,
                     "send/recv within the group")
    got = alone[rank].all_reduce(x.to(device))
    assert_close("communicator.new_group", got, x, dtype, f"all_reduce of a group of one, rank {rank}")
    for sub in (whole, *alone):
        sub.destroy()


def check_all_to_all(comm: Communicator, rank: int, world_size: int, device: torch.device,
                     dtype: torch.dtype) -> None:
    """``all_to_all``: rank ``i`` sends rank ``j`` ``(i + 2 * j + 1) % 3`` rows (uneven, some zero, some to itself),
    each row tagged with its sender, receiver and position, so a row delivered to the wrong rank or out of order
    shows; rows are [n, 2, 3], so trailing dimensions must travel too."""
    def rows(i: int, j: int) -> torch.Tensor:
        n = (i + 2 * j + 1) % 3
        tag = torch.tensor([[100.0 * i + 10.0 * j + r] for r in range(n)]).reshape(n, 1, 1)
        return (tag + torch.arange(6, dtype=dtype).reshape(1, 2, 3) / 8).to(dtype)

    send_counts = [(rank + 2 * j + 1) % 3 for j in range(world_size)]
    recv_counts = [(i + 2 * rank + 1) % 3 for i in range(world_size)]
    mine = torch.cat([rows(rank, j) for j in range(world_size)])
    try:
        got = comm.all_to_all(mine.to(device), send_counts, recv_counts)
    except Exception as exc:
        raise ContractViolation("communicator.all_to_all", f"{comm.name}.all_to_all raised {type(exc).__name__}: "
                                                           f"{exc}") from exc
    want = torch.cat([rows(i, rank) for i in range(world_size)])
    require(isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(want.shape), "communicator.all_to_all",
            f"rank {rank}: expected a tensor of shape {tuple(want.shape)}, got "
            f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
    assert_close("communicator.all_to_all", got.cpu(), want, dtype, f"send_counts={send_counts}, rank {rank}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--platform", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--init-method", required=True)
    ap.add_argument("--extra-plugin", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        run_checks(args.platform, args.rank, args.world_size, args.init_method, args.extra_plugin)
    except ContractViolation as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"[communicator] rank {args.rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
