"""llmctl on Google TPUs through torch_xla.

XLA compiles one graph per distinct input shape, so a TPU runner pads every step to a bucket
(:mod:`llmctl_tpu.bucketing`) and compiles the buckets of :func:`~llmctl_tpu.bucketing.warmup_plan` at start-up.
Registers the ``tpu`` platform (priority 90), a ragged-paged-attention backend and an XLA collectives
communicator. Nothing imports torch_xla at import time: it initializes the PJRT runtime.
"""

from __future__ import annotations

from collections.abc import Callable

from llmctl.plugins import hookimpl
from llmctl.plugins.types import AttentionBackend, Communicator, DoctorCheck, Platform

LLMCTL_API_VERSION = "2.5"


@hookimpl
def llmctl_register_platforms(register: Callable[[Platform], None]) -> None:
    from llmctl_tpu.platform import TpuPlatform

    register(TpuPlatform())


@hookimpl
def llmctl_register_attention_backends(register: Callable[[AttentionBackend], None]) -> None:
    from llmctl_tpu.attention import RaggedPagedAttention

    register(RaggedPagedAttention())


@hookimpl
def llmctl_register_communicators(register: Callable[[Communicator], None]) -> None:
    from llmctl_tpu.communicator import XlaCommunicator

    register(XlaCommunicator())


@hookimpl
def llmctl_doctor_checks(register: Callable[[DoctorCheck], None]) -> None:
    from llmctl_tpu.platform import doctor_check

    register(DoctorCheck("tpu", doctor_check))
