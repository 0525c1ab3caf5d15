"""EngineModule's attribute mirror: fast lookups after loading, and later changes still seen."""

from __future__ import annotations

import pytest
import torch
from llmctl.layers._module import EngineModule
from torch import nn


class _Leaf(EngineModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2))
        self.bias = nn.Parameter(torch.zeros(2))
        self.register_buffer("table", torch.zeros(3))
        self.child = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


def test_mirror_serves_lookups_and_follows_reassignment() -> None:
    m = _Leaf()
    m.freeze_attribute_lookup()
    for name in ("weight", "bias", "table", "child"):
        assert name in m.__dict__ and getattr(m, name) is getattr(m, "_" + {"table": "buffers", "child": "modules"}
                                                                  .get(name, "parameters"))[name]
    new_w = nn.Parameter(torch.ones(2))
    m.weight = new_w
    assert m.weight is new_w and m._parameters["weight"] is new_w
    m.bias = None
    assert m.bias is None and m._parameters["bias"] is None
    m.table = torch.ones(3)
    assert torch.equal(m.table, torch.ones(3)) and m._buffers["table"] is m.table
    other = nn.ReLU()
    m.child = other
    assert m.child is other
    del m.table
    with pytest.raises(AttributeError):
        _ = m.table
    m.plain = 5  # ordinary attributes are untouched
    assert m.plain == 5 and "plain" not in m._parameters
    assert torch.equal(m(torch.zeros(2)), torch.ones(2))


def test_loaded_models_are_frozen(tiny_llama_dir) -> None:
    from llmctl import LLM

    llm = LLM(str(tiny_llama_dir), dtype="float32")
    model = llm.llm_engine.core.model
    frozen = [mod for mod in model.modules() if isinstance(mod, EngineModule)]
    assert frozen and all(mod._lookup_frozen for mod in frozen)
    assert all(name in mod.__dict__ for mod in frozen for name in mod._modules)
