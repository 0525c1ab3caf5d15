"""Template llmctl backend plugin (``example-cpu``): copy this package, rename it, replace the ``VENDOR:`` parts.

Core finds this module through the entry point in pyproject.toml, checks ``LLMCTL_API_VERSION`` and calls each
``@hookimpl`` below once with a ``register`` callback. Importing this module must stay cheap and must not touch
the hardware: detection belongs in ``Platform.probe()``, which core calls lazily.
"""

from __future__ import annotations

from collections.abc import Callable

from llmctl.plugins import hookimpl
from llmctl.plugins.types import AttentionBackend, Communicator, DoctorCheck, OpOverride, Platform

# The plugin contract this package was written against; core refuses a different major version.
LLMCTL_API_VERSION = "2.5"

PLATFORM_NAME = "example-cpu"  # VENDOR: your platform name, as users pass it to device=...


@hookimpl
def llmctl_register_platforms(register: Callable[[Platform], None]) -> None:
    from llmctl_example_backend.platform import ExampleCpuPlatform

    register(ExampleCpuPlatform())


@hookimpl
def llmctl_register_attention_backends(register: Callable[[AttentionBackend], None]) -> None:
    from llmctl_example_backend.attention import ExampleMatmulAttention

    register(ExampleMatmulAttention())


@hookimpl
def llmctl_register_ops(register: Callable[[OpOverride], None]) -> None:
    from llmctl_example_backend import ops

    # VENDOR: register only the ops you have faster kernels for; the rest keep core's reference.
    register(OpOverride("rms_norm", ops.rms_norm, platform=PLATFORM_NAME, priority=10))
    register(OpOverride("fused_add_rms_norm", ops.fused_add_rms_norm, platform=PLATFORM_NAME, priority=10))
    register(OpOverride("greedy_sample", ops.greedy_sample, platform=PLATFORM_NAME, priority=10))


@hookimpl
def llmctl_register_communicators(register: Callable[[Communicator], None]) -> None:
    from llmctl_example_backend.communicator import ExampleGlooCommunicator

    register(ExampleGlooCommunicator())


@hookimpl
def llmctl_doctor_checks(register: Callable[[DoctorCheck], None]) -> None:
    from llmctl_example_backend.doctor import runtime_check

    register(DoctorCheck("example-cpu runtime", runtime_check))
