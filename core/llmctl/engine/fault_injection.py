"""A test seam, kept off the step's hot path: with ``LLMCTL_ENABLE_FAULT_INJECTION=1`` when an engine starts, a
request whose ``extra_args`` hold ``{"inject_fault": "forward"}`` makes the step that runs it raise
``InjectedFault``, so tests can watch the core isolate one request's failure from the rest of the batch.

Installed once per engine by wrapping ``EngineCore._run``; without the variable the engine runs the step with no
check at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

FAULT_INJECTION_ENV = "LLMCTL_ENABLE_FAULT_INJECTION"


class InjectedFault(RuntimeError):
    """Raised on purpose by the test-only fault injection seam."""


def install_if_enabled(core: Any) -> bool:
    """Wrap ``core._run`` with the check when the environment asks for it; returns whether it did."""
    if os.environ.get(FAULT_INJECTION_ENV) != "1":
        return False
    run: Callable[[Any], Any] = core._run

    def run_with_injected_faults(sched: Any) -> Any:
        for item in sched.scheduled:
            extra = item.request.sampling_params.extra_args or {}
            if extra.get("inject_fault") == "forward":
                raise InjectedFault(f"injected model fault for request {item.request.request_id}")
        return run(sched)

    core._run = run_with_injected_faults
    return True
