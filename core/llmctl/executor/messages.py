"""What the ``mp`` driver and its workers say to each other, one pickled tuple per message over a pipe the
driver created itself (nothing else can write to it, so unpickling it trusts only this process). A step's message
is pickled once and the same bytes go to every rank.

Driver to every worker: ``("step", ops)`` (apply the queued request changes, then run one engine step),
``("sync", ops)`` (apply them without a step), ``("shutdown",)``. An op is ``("add", [Request, ...])``,
``("abort", [request_id, ...])`` or ``("finish", request_id, RequestStatus)``, in the order the frontend made them.
Rank 0 answers each step or sync with ``("ok", [CoreOutput, ...], stats)``; any rank that fails says
``("error", exception type name, message)`` and exits.
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
