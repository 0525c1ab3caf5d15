"""A benchmark seam: with ``LLMCTL_COMM_PROFILE_DIR`` set when an engine starts, each rank counts the calls to
its communicator's collectives and the time spent inside them, and the time spent in its engine steps, so a
tensor-parallel step's time can be split into communication, the rest of the rank's step, and the driver's own
overhead (what the driver waits for beyond its rank 0's step).

The totals reach the driver two ways: rank 0's ride on its step replies as ``comm_profile_*`` keys of
``get_stats()`` (cumulative, so a caller takes differences around the part it times), and every rank writes
``rank<r>.json`` into the directory when it shuts down. Installed once per engine by wrapping the communicator's
methods and the core's ``step``, ``get_stats`` and ``shutdown`` on the instances, as the fault-injection seam
does: without the variable nothing is wrapped and the step carries no timer.

Time inside a collective includes waiting for the slower peer to arrive, so it is the communication cost a rank
sees, load imbalance included, not the wire time alone.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COMM_PROFILE_ENV = "LLMCTL_COMM_PROFILE_DIR"
PROFILED_OPS = ("all_reduce", "all_gather", "all_to_all", "broadcast", "send", "recv", "barrier")
STATS_PREFIX = "comm_profile_"


@dataclass
class CommProfile:
    """Cumulative counters of one rank."""

    rank: int = 0
    world_size: int = 1
    calls: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    step_seconds: float = 0.0

    @property
    def comm_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def comm_calls(self) -> int:
        return sum(self.calls.values())

    def add(self, op: str, seconds: float) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        self.seconds[op] = self.seconds.get(op, 0.0) + seconds

    def as_stats(self) -> dict[str, Any]:
        """Flat ``comm_profile_*`` keys for ``get_stats()``."""
        out: dict[str, Any] = {f"{STATS_PREFIX}steps": self.steps, f"{STATS_PREFIX}step_s": self.step_seconds,
                               f"{STATS_PREFIX}comm_s": self.comm_seconds,
                               f"{STATS_PREFIX}comm_calls": self.comm_calls}
        for op in self.calls:
            out[f"{STATS_PREFIX}{op}_calls"] = self.calls[op]
            out[f"{STATS_PREFIX}{op}_s"] = self.seconds[op]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "comm_seconds": self.comm_seconds, "comm_calls": self.comm_calls}


def profile_communicator(comm: Any, profile: CommProfile, ops: tuple[str, ...] = PROFILED_OPS) -> None:
    """Replace ``comm``'s collective methods, on the instance, by timed calls that add to ``profile``."""
    for op in ops:
        method = getattr(comm, op, None)
        if method is None:
            continue
        setattr(comm, op, _timed(method, op, profile))


def _timed(method: Callable[..., Any], op: str, profile: CommProfile) -> Callable[..., Any]:
    clock = time.perf_counter

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        try:
            return method(*args, **kwargs)
        finally:
            profile.add(op, clock() - t0)

    timed.__name__ = op
    return timed


def install_if_enabled(core: Any) -> CommProfile | None:
    """Instrument ``core`` (an ``EngineCore``) when the environment asks for it; returns the rank's counters."""
    out_dir = os.environ.get(COMM_PROFILE_ENV)
    if not out_dir:
        return None
    world = core.world
    profile = CommProfile(rank=world.rank, world_size=world.size)
    if world.communicator is not None:  # the pipeline stage and the TP group share this object
        profile_communicator(world.communicator, profile)
    step, get_stats, shutdown = core.step, core.get_stats, core.shutdown
    clock = time.perf_counter

    def timed_step() -> Any:
        t0 = clock()
        try:
            return step()
        finally:
            profile.steps += 1
            profile.step_seconds += clock() - t0

    def stats_with_profile() -> dict[str, Any]:
        return {**get_stats(), **profile.as_stats()}

    def shutdown_and_write() -> None:
        write_profile(profile, Path(out_dir))
        shutdown()

    core.step, core.get_stats, core.shutdown = timed_step, stats_with_profile, shutdown_and_write
    core.comm_profile = profile
    return profile


def write_profile(profile: CommProfile, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"rank{profile.rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.to_dict()))
    tmp.replace(path)
    return path


def read_profiles(out_dir: Path) -> dict[int, dict[str, Any]]:
    """Every ``rank<r>.json`` the ranks wrote into ``out_dir``, by rank."""
    found: dict[int, dict[str, Any]] = {}
    for path in sorted(Path(out_dir).glob("rank*.json")):
        data = json.loads(path.read_text())
        found[int(data["rank"])] = data
    return found


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """The ``comm_profile_*`` counters accumulated between two ``get_stats()`` snapshots, without the prefix."""
    return {k[len(STATS_PREFIX):]: after[k] - before.get(k, 0) for k in after if k.startswith(STATS_PREFIX)}
