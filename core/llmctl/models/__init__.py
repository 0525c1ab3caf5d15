"""Native model architectures."""

from __future__ import annotations

from llmctl.plugins.types import ModelArchitecture


def native_architectures() -> list[ModelArchitecture]:
    return []
