"""What the driver and its ranks say to each other.

Driver to every rank: one typed step message per step (``llmctl.executor.step_codec``: msgspec, encoded once and
decoded against a fixed schema, never unpickled), carrying ``kind`` (``step``: apply the queued request changes,
then run one engine step; ``sync``: apply them without a step; ``shutdown``) and the ops in the order the frontend
made them. Under ``mp`` it travels through the shared-memory ring (``llmctl.executor.shm_ring``) to every local
rank at once, or, with ``LLMCTL_MP_SHM_BROADCAST=0`` or where no segment can be created, over each rank's pipe.
Inside the driver (and after decoding, inside a rank) an op is the tuple ``("add", [Request, ...])``,
``("abort", [request_id, ...])`` or ``("finish", request_id, RequestStatus)``.

Ranks to the driver, over the pipe the driver created for that rank (so nothing but that rank can write what the
driver unpickles): ``("ready", info)`` once, then rank 0 answers each step or sync with
``("ok", [CoreOutput, ...], stats)``; any rank that fails says ``("error", exception type name, message)`` and
exits.
"""

from __future__ import annotations

import os
from typing import Any

STEP, SYNC, SHUTDOWN = "step", "sync", "shutdown"
ADD, ABORT, FINISH = "add", "abort", "finish"
READY, OK, ERROR = "ready", "ok", "error"

# vLLM's name for the same bound: a step that takes longer than this means a hung rank.
STEP_TIMEOUT_ENV = "LLMCTL_EXECUTE_MODEL_TIMEOUT_SECONDS"
START_TIMEOUT_ENV = "LLMCTL_WORKER_START_TIMEOUT_SECONDS"
BIND_CPUS_ENV = "LLMCTL_MP_BIND_CPUS"
SHM_BROADCAST_ENV = "LLMCTL_MP_SHM_BROADCAST"  # "0": step messages over the per-rank pipes instead


def env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name}: must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise ValueError(f"{name}: must be > 0 seconds, got {value!r}")
    return seconds


def error_message(exc: BaseException) -> tuple[str, str, str]:
    return (ERROR, type(exc).__name__, str(exc))


Op = tuple[Any, ...]
