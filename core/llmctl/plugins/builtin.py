"""What core registers itself, through the same hooks as any plugin: the reference attention backend and the
native model architectures."""

from __future__ import annotations

from llmctl.plugins.hookspecs import hookimpl

LLMCTL_API_VERSION = "2.0"


@hookimpl
def llmctl_register_attention_backends(register) -> None:
    from llmctl.plugins.reference_attention import TorchReferenceAttention

    register(TorchReferenceAttention())


@hookimpl
def llmctl_register_models(register) -> None:
    from llmctl.models import native_architectures

    for arch in native_architectures():
        register(arch)
