"""The ``ray`` executor: one Ray actor per rank, placed by a placement group on a running Ray cluster (or a local
instance when none is reachable through ``RAY_ADDRESS``), so ranks can sit on several machines.

The ranks are the same as under ``mp`` (``llmctl.executor.worker.RankEngine``); only the transport differs: each
step is one actor call per rank carrying the same typed step message (``llmctl.executor.step_codec``), and rank
0's call returns the outputs. An actor that dies (its process or its node) or a step past the step timeout ends
the engine with ``EngineDeadError``, and every actor is killed and the placement group removed.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from llmctl.config import EngineArgs
from llmctl.executor import messages as msg
from llmctl.executor.remote import RemoteCore

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 60.0


class _RayRank:
    """The actor: holds a ``RankEngine`` once ``start`` has built it."""

    def __init__(self) -> None:
        self.engine: Any = None

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def start(self, rank: int, world_size: int, init_method: str, args: Any) -> dict[str, Any] | None:
        from llmctl.executor.worker import RankEngine

        self.engine = RankEngine(rank, world_size, init_method, args)
        return self.engine.info()

    def execute(self, payload: bytes) -> tuple[Any, ...] | None:
        return self.engine.handle_payload(payload)  # typed bytes, decoded against the step schema

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Ray's own connect retries for minutes against an address where nothing listens; a TCP connect first turns
    a wrong ``RAY_ADDRESS`` into an immediate error (``auto`` and a missing address are left to Ray)."""
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    import socket

    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ValueError(f"distributed_executor_backend: Ray is not reachable at RAY_ADDRESS={address!r} ({exc}); "
                         f"start the cluster with `ray start --head` or fix RAY_ADDRESS") from None


class RayCore(RemoteCore):
    def __init__(self, args: EngineArgs) -> None:
        super().__init__(args)
        try:
            import ray
        except ImportError:
            raise ValueError("distributed_executor_backend: 'ray' needs Ray: pip install 'ray[default]'") from None
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from llmctl.plugins import get_plugin_manager

        self._ray = ray
        self._remove_pg = remove_placement_group
        self._actors: list[Any] = []
        self._calls: list[Any] = []
        self._pg: Any = None
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            _check_reachable(address)
            try:
                ray.init(address=address, log_to_driver=False)  # None: a local instance
            except (ConnectionError, RuntimeError) as exc:
                raise ValueError(f"distributed_executor_backend: Ray is not reachable at "
                                 f"RAY_ADDRESS={address!r} ({exc}); start it with `ray start --head`") from None
        device_type = get_plugin_manager().select_platform(args.device).device_type
        bundle = {"GPU": 1.0} if device_type == "cuda" else {"CPU": 1.0}
        self._pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        ready, _ = ray.wait([self._pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            available = ray.available_resources()
            self._stop()
            raise ValueError(f"tensor_parallel_size: {self.world_size} ranks need {self.world_size} x {bundle} in "
                             f"the Ray cluster, which has {available} available")
        actor_cls = ray.remote(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0))(_RayRank)
        self._actors = [actor_cls.options(
            name=None, scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=r),
            runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}).remote()
            for r in range(self.world_size)]
        try:
            head_ip = ray.get(self._actors[0].node_ip.remote(), timeout=self._start_timeout)
            port = ray.get(self._actors[0].free_port.remote(), timeout=self._start_timeout)
            init_method = f"tcp://{head_ip}:{port}"
            refs = [a.start.remote(r, self.world_size, init_method, args) for r, a in enumerate(self._actors)]
            infos = self._gather(refs, self._start_timeout, "start")
        except BaseException as exc:
            self._stop()
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ValueError):  # a configuration error raised in a rank: the user's to fix
                raise ValueError(str(cause)) from None
            raise
        self._set_info(infos[0])
        logger.info("llmctl ray executor: %d ranks ready (rank 0 at %s)", self.world_size, head_ip)

    def _gather(self, refs: list[Any], timeout: float, what: str) -> list[Any]:
        """Every call's result, failing as soon as one call fails (a dead actor) rather than when the ranks
        waiting on it in a collective give up."""
        ray = self._ray
        results: dict[Any, Any] = {}
        pending = list(refs)
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from the tensor-parallel ranks within {timeout:g} s ({what}); a "
                                   f"rank hangs (raise {msg.STEP_TIMEOUT_ENV} if steps are legitimately this slow)")
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in ready:
                try:
                    results[ref] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    raise RuntimeError(f"tensor-parallel rank {refs.index(ref)} died during {what}: {exc}") from exc
                except ray.exceptions.RayTaskError as exc:
                    if what == "start":
                        raise
                    raise RuntimeError(f"tensor-parallel rank {refs.index(ref)} failed during {what}: "
                                       f"{exc.cause!r}") from exc
        return [results[r] for r in refs]

    def _send(self, payload: bytes) -> None:
        ref = self._ray.put(payload)
        self._calls = [a.execute.remote(ref) for a in self._actors]

    def _receive(self) -> tuple[Any, ...]:
        calls, self._calls = self._calls, []
        return self._gather(calls, self._step_timeout, "a step")[0]

    @property
    def actors(self) -> list[Any]:
        return list(self._actors)

    def _stop(self) -> None:
        ray = self._ray
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # already gone
                logger.debug("ray.kill: %s", exc)
        self._actors = []
        if self._pg is not None:
            try:
                self._remove_pg(self._pg)
            except Exception as exc:
                logger.debug("remove_placement_group: %s", exc)
            self._pg = None
