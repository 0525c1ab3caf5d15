"""Plugin loading, tolerances and comparison helpers shared by the contract checks.

Kept free of pytest so the checks can run from a vendor's own CI script or a notebook as well.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from llmctl.plugins import PluginManager, reset_plugin_manager


class ContractViolation(AssertionError):
    """A backend broke a clause of the plugin contract; the message starts with ``[clause]``."""

    def __init__(self, clause: str, message: str) -> None:
        super().__init__(f"[{clause}] {message}")
        self.clause = clause


def require(cond: bool, clause: str, message: str) -> None:
    if not cond:
        raise ContractViolation(clause, message)


def load_plugin_manager(extra_modules: list[str] | None = None) -> PluginManager:
    """Entry points plus ``extra_modules`` (imported and loaded as plugins named after the module), installed as
    the process-wide manager. An extra module that fails to import is an error here, not a silent skip: the
    user asked for it by name."""
    extra = {name: importlib.import_module(name) for name in (extra_modules or [])}
    return reset_plugin_manager(lambda: PluginManager().load(extra=extra))


def describe_plugins(manager: PluginManager) -> str:
    parts = []
    for info in manager.plugins.values():
        state = "broken: " + (info.error or "") if info.broken else ("disabled" if info.disabled else "ok")
        parts.append(f"{info.name} ({state})")
    return ", ".join(parts) or "none"


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise."""

    atol: float
    rtol: float


# float32 leaves room for TF32-style matmuls on accelerators; half types for one rounding of the output plus
# half-precision probabilities. A wrong mask, scale or block lookup errs by O(0.1..1), far above all of these.
_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(2e-3, 2e-3),
    torch.float16: Tolerance(1e-2, 1e-2),
    torch.bfloat16: Tolerance(3e-2, 3e-2),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    return _TOLERANCES.get(dtype, Tolerance(5e-2, 5e-2))


def assert_close(clause: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Compare in float32 on the CPU; the message names the clause, the worst element and the tolerance."""
    require(tuple(actual.shape) == tuple(expected.shape), clause,
            f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().float().cpu()
    e = expected.detach().float().cpu()
    bad_nan = torch.isnan(a) & ~torch.isnan(e)
    if bool(bad_nan.any()):
        raise ContractViolation(
            clause, f"{what}: {int(bad_nan.sum())} NaN values where the reference has numbers (first at index "
                    f"{tuple(bad_nan.nonzero()[0].tolist())}); did the kernel read KV slots outside the "
                    f"sequence's context, or leave output rows unwritten?")
    tol = tolerance(dtype)
    err = (a - e).abs()
    limit = tol.atol + tol.rtol * e.abs()
    over = err > limit
    if bool(over.any()):
        idx = tuple(int(i) for i in torch.unravel_index((err - limit).flatten().argmax(), err.shape))
        raise ContractViolation(
            clause, f"{what}: max abs err {float(err.max()):.3e} > tol (atol={tol.atol:g}, rtol={tol.rtol:g}) "
                    f"for {dtype}; {int(over.sum())}/{over.numel()} elements out of tolerance, worst at index "
                    f"{idx}: got {float(a[idx]):.5g}, expected {float(e[idx]):.5g}")
