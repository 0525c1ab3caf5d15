"""What every pipeline-parallel decoder shares: the placeholder of another stage's layer, which checkpoint tensors
a stage reads, and the last stage's logits broadcast (see ``llmctl.tensor_parallel.PipelineStage``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from llmctl.layers._module import EngineModule
from llmctl.tensor_parallel import PipelineStage

LAYER_PREFIX = "model.layers."


class OtherStageLayer(EngineModule):
    """A decoder layer that another pipeline stage holds: no parameters, never called. It keeps the layer
    indices (and so the checkpoint's names) of the stage's own layers unchanged."""

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("this decoder layer belongs to another pipeline stage")


def on_stage(name: str, start: int, end: int) -> bool:
    """Whether the (canonical) checkpoint tensor ``name`` belongs to layers [start, end); tensors outside the
    decoder layers (embeddings, final norm, LM head) belong to every stage."""
    if not name.startswith(LAYER_PREFIX):
        return True
    index = int(name[len(LAYER_PREFIX):].split(".", 1)[0])
    return start <= index < end


def stage_logits(pp: PipelineStage, hidden: torch.Tensor, vocab_size: int,
                 logits_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The last stage's logits on every stage: only the last has the final hidden states, and every rank samples
    the same token from the same logits (every rank calls this in the same order)."""
    if pp.size == 1:
        return logits_of(hidden)
    if pp.is_last:
        logits = logits_of(hidden).contiguous()
    else:
        logits = torch.empty((hidden.shape[0], vocab_size), dtype=hidden.dtype, device=hidden.device)
    return pp.broadcast_from_last(logits)
