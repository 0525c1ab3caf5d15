"""llmctl's CPU backend, found by core only through the ``llmctl.plugins`` entry point.

Imports of the implementation modules happen inside the hooks so that merely discovering the plugin (for
``llmctl doctor`` or a GPU host that never selects the CPU) costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmctl.plugins import hookimpl

LLMCTL_API_VERSION = "2.5"


@hookimpl
def llmctl_register_platforms(register: Callable[[Any], None]) -> None:
    from llmctl_cpu.platform import CpuPlatform

    register(CpuPlatform())


@hookimpl
def llmctl_register_attention_backends(register: Callable[[Any], None]) -> None:
    from llmctl_cpu.attention import CpuSdpaAttention

    register(CpuSdpaAttention())


@hookimpl
def llmctl_register_ops(register: Callable[[Any], None]) -> None:
    from llmctl_cpu.ops import op_overrides

    for op in op_overrides():
        register(op)


@hookimpl
def llmctl_register_communicators(register: Callable[[Any], None]) -> None:
    from llmctl_cpu.communicator import GlooCommunicator

    register(GlooCommunicator())


@hookimpl
def llmctl_doctor_checks(register: Callable[[Any], None]) -> None:
    from llmctl_cpu.doctor import doctor_checks

    for check in doctor_checks():
        register(check)


@hookimpl
def llmctl_register_quantization(register: Callable[[Any], None]) -> None:
    from llmctl_cpu.quant import quant_overrides

    for kernel in quant_overrides():
        register(kernel)
