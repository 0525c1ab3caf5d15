"""llmctl on Intel GPUs through ``torch.xpu``.

Registers the ``xpu`` platform (priority 90), an attention backend on Intel Extension for PyTorch's paged
attention (install the ``[ipex]`` extra; without it, core's reference backend runs on XPU), an xccl/ccl
communicator and a doctor check. Nothing here touches the device at import time.
"""

from __future__ import annotations

from collections.abc import Callable

from llmctl.plugins import hookimpl
from llmctl.plugins.types import AttentionBackend, Communicator, DoctorCheck, Platform

LLMCTL_API_VERSION = "2.5"


@hookimpl
def llmctl_register_platforms(register: Callable[[Platform], None]) -> None:
    from llmctl_xpu.platform import XpuPlatform

    register(XpuPlatform())


@hookimpl
def llmctl_register_attention_backends(register: Callable[[AttentionBackend], None]) -> None:
    from llmctl_xpu.attention import IpexPagedAttention

    register(IpexPagedAttention())


@hookimpl
def llmctl_register_communicators(register: Callable[[Communicator], None]) -> None:
    from llmctl_xpu.communicator import XpuCommunicator

    register(XpuCommunicator())


@hookimpl
def llmctl_doctor_checks(register: Callable[[DoctorCheck], None]) -> None:
    from llmctl_xpu.platform import doctor_check

    register(DoctorCheck("xpu", doctor_check))
