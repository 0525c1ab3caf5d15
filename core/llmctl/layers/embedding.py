"""Token embedding and the output projection (which may share its weight)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from llmctl.layers._module import EngineModule
from llmctl.layers._params import empty_param
from llmctl.layers.linear import _quantized_linear, bind_linear_ops

if TYPE_CHECKING:
    from llmctl.lora.layers import LoRAEmbeddingSlots, LoRALinearSlots
from llmctl.ops import Ops
from llmctl.ops.reference import PackedLinearWeight


class VocabEmbedding(EngineModule):
    lora: LoRAEmbeddingSlots | None = None  # set by llmctl.lora when LoRA is enabled

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = empty_param(vocab_size, hidden_size, dtype=dtype, device=device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        y = F.embedding(input_ids, self.weight)
        return y if self.lora is None else self.lora.add(input_ids, y)


class LMHead(EngineModule):
    """Hidden states -> logits in the model's dtype (the sampler casts to float32 only where it needs to: greedy
    batches take the argmax of the model's own values). With ``tied_to`` it reuses the embedding's parameter
    object, so loading the embedding loads both and no second vocab-sized matrix is allocated."""

    lora: LoRALinearSlots | None = None  # set by llmctl.lora when LoRA is enabled (adapters targeting lm_head)
    quant_parts: list[tuple[Any, dict[str, torch.Tensor], Any, slice | None]] | None = None

    def __init__(self, vocab_size: int, hidden_size: int, *, tied_to: VocabEmbedding | None = None,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.tied = tied_to is not None
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = empty_param(vocab_size, hidden_size, dtype=dtype, device=device)
        self._linear = F.linear
        self._packed: PackedLinearWeight | None = None

    def bind_ops(self, ops: Ops) -> None:
        if self.quant_parts is not None:
            return  # the quantization kernel runs the head (bind_quantized)
        bind_linear_ops(self, ops, release_plain=not self.tied)  # the embedding still reads a tied weight

    def bind_quantized(self, parts: list[tuple[Any, dict[str, torch.Tensor], Any, slice | None]]) -> None:
        """After loading: the head's matmul through a quantization kernel on the checkpoint's own blocks
        (``QuantConfig.lm_head_part``). A tied embedding keeps reading the plain weight; an untied one is freed."""
        self.quant_parts = parts
        self._packed = torch.empty(0)
        self._linear = lambda x, _w, b=None: _quantized_linear(parts, x, _w, b)
        if not self.tied:
            self.weight.data = self.weight.data.new_empty(0)

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every row's full-vocabulary logits (a split head gathers them here), before any adapter."""
        return self._linear(hidden, self.weight if self._packed is None else self._packed)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base_logits(hidden)
        return logits if self.lora is None else self.lora.add(hidden, logits)
