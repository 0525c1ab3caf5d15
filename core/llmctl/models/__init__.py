"""Native model architectures."""

from __future__ import annotations

from llmctl.plugins.types import ModelArchitecture


def native_architectures() -> list[ModelArchitecture]:
    from llmctl.models.llama import ARCHITECTURES, LlamaForCausalLM

    return [ModelArchitecture(name, LlamaForCausalLM) for name in ARCHITECTURES]
