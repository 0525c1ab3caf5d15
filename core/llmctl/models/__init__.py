"""Native model architectures (the table lives in :mod:`llmctl.models.supported`)."""

from __future__ import annotations

from llmctl.plugins.types import ModelArchitecture


def native_architectures() -> list[ModelArchitecture]:
    from llmctl.models.supported import native_architectures as _native

    return _native()
