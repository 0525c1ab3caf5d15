"""The plugin hooks of a torch.cuda platform, written once and parameterised by what differs between NVIDIA and
AMD: the platform class, the attention backends, the communicator's name and the doctor checks.

A plugin module binds them to module-level names, so its entry point stays the module::

    _hooks = GpuPluginHooks("rocm", platform=..., attention_backends=..., communicator_name="rccl", doctor_checks=...)
    llmctl_register_platforms = _hooks.llmctl_register_platforms
    ...

Every factory is called inside its hook, so importing a plugin stays cheap and touches no GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmctl.plugins import hookimpl
from llmctl.plugins.types import AttentionBackend, Communicator, DoctorCheck, OpOverride, Platform, QuantMethod


@dataclass(frozen=True)
class GpuPluginHooks:
    platform_name: str
    platform: Callable[[], Platform]
    attention_backends: Callable[[], Sequence[AttentionBackend]]
    communicator_name: str
    doctor_checks: Callable[[], Sequence[DoctorCheck]]

    @hookimpl
    def llmctl_register_platforms(self, register: Callable[[Platform], None]) -> None:
        register(self.platform())

    @hookimpl
    def llmctl_register_attention_backends(self, register: Callable[[AttentionBackend], None]) -> None:
        for backend in self.attention_backends():
            register(backend)

    @hookimpl
    def llmctl_register_ops(self, register: Callable[[OpOverride], None]) -> None:
        from llmctl_triton.backend import op_overrides

        for op in op_overrides(self.platform_name):
            register(op)

    @hookimpl
    def llmctl_register_quantization(self, register: Callable[[QuantMethod], None]) -> None:
        from llmctl_triton.quant import quant_methods

        for method in quant_methods(self.platform_name):
            register(method)

    @hookimpl
    def llmctl_register_communicators(self, register: Callable[[Communicator], None]) -> None:
        from llmctl_gpu.communicator import GpuCommunicator

        # torch's "nccl" process-group backend is RCCL on ROCm builds.
        register(GpuCommunicator(name=self.communicator_name, platform=self.platform_name, backend="nccl"))

    @hookimpl
    def llmctl_doctor_checks(self, register: Callable[[DoctorCheck], None]) -> None:
        for check in self.doctor_checks():
            register(check)
