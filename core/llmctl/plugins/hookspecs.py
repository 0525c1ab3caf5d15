"""The plugin contract: the hooks a backend package implements.

A backend is a Python package with an entry point in the group ``llmctl.plugins``::

    [project.entry-points."llmctl.plugins"]
    mybackend = "mybackend_llmctl"

The module (or object) the entry point names must define ``LLMCTL_API_VERSION = "2.5"`` (the contract version
it was written against; core refuses a different major version) and implement any of the hooks below with
``@llmctl.plugins.hookimpl``. Every hook receives a ``register`` callback and returns nothing: registering is
the only thing a plugin does, so core stays in charge of scheduling, KV blocks, the model runner and sampling.

Names are open strings; when two plugins register the same name, the higher ``priority`` wins. Hooks run once
per process, when the plugin manager loads.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from llmctl.plugins.types import (
    AttentionBackend,
    Communicator,
    DoctorCheck,
    ModelArchitecture,
    OpOverride,
    Platform,
    QuantMethod,
)

PROJECT_NAME = "llmctl"
# The changelog, with the migration note from 1.x, is in docs/plugins.md.
# 2.0: AttentionBackend.forward takes keyword-only ``key``/``value`` (always passed; accepts_new_kv is gone);
# Platform.options (settings of one platform, applied in configure); Platform.synchronize and
# Platform.dist_backend are gone (core never called them). 1.x plugins are refused.
API_VERSION = "2.5"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def llmctl_register_platforms(register: Callable[[Platform], None]) -> None:
    """Register :class:`~llmctl.plugins.types.Platform` instances.

    ``probe()`` is called lazily, when core selects a platform or ``llmctl doctor`` asks, and must not raise.
    Give a dedicated accelerator a priority above the CPU's (0) so it wins when present.
    """


@hookspec
def llmctl_register_attention_backends(register: Callable[[AttentionBackend], None]) -> None:
    """Register :class:`~llmctl.plugins.types.AttentionBackend` instances.

    Core asks, in priority order, each backend of the selected platform whether it ``supports`` the model's
    dtype, head size, block size and features, and uses the first that does (``LLMCTL_ATTENTION_BACKEND``
    forces one by name). Your ``forward`` must match :func:`llmctl.ops.paged_attention.paged_attention_reference`
    within the dtype's tolerance; ``llmctl-testkit`` checks it.
    """


@hookspec
def llmctl_register_ops(register: Callable[[OpOverride], None]) -> None:
    """Register op overrides by name (see ``llmctl.ops.reference.OP_NAMES``) for a platform.

    An override replaces the reference only on its platform and must keep the reference's signature.
    """


@hookspec
def llmctl_register_quantization(register: Callable[[QuantMethod], None]) -> None:
    """Register kernels for quantized linear layers (:class:`~llmctl.plugins.types.QuantMethod`), one per weight
    format (``QUANT_FORMATS``: "int4", "int8", "fp8", "gguf") and the platforms it runs on. Core unpacks every
    checkpoint format (GGUF, GPTQ, AWQ, compressed-tensors, quantize-at-load) into those formats and registers a
    torch reference for each; a plugin's kernel wins on its platforms where its ``supports`` accepts the layer."""


@hookspec
def llmctl_register_communicators(register: Callable[[Communicator], None]) -> None:
    """Register a collective-communication implementation for a platform (used for tensor parallelism)."""


@hookspec
def llmctl_register_models(register: Callable[[ModelArchitecture], None]) -> None:
    """Register model classes for Hugging Face architecture names; core's own models have priority 0."""


@hookspec
def llmctl_doctor_checks(register: Callable[[DoctorCheck], None]) -> None:
    """Register extra diagnostics for ``llmctl doctor`` (driver versions, firmware, missing libraries)."""
