"""What core registers itself, through the same hooks as any plugin: the reference attention backend, the
native model architectures and the torch reference of each quantized weight format."""

from __future__ import annotations

from llmctl.plugins.hookspecs import hookimpl

LLMCTL_API_VERSION = "2.5"


@hookimpl
def llmctl_register_attention_backends(register) -> None:
    from llmctl.plugins.reference_attention import TorchReferenceAttention

    register(TorchReferenceAttention())


@hookimpl
def llmctl_register_models(register) -> None:
    from llmctl.models import native_architectures

    for arch in native_architectures():
        register(arch)


@hookimpl
def llmctl_register_quantization(register) -> None:
    from llmctl.quantization.reference import reference_kernels

    for kernel in reference_kernels():
        register(kernel)
