"""Multi-LoRA serving: PEFT adapters applied per request on top of one base model, several in one batch.

A request names its adapter with a :class:`LoRARequest`. The adapter's weights are read and checked on the
caller's thread (:mod:`llmctl.lora.adapter`), cached on the host (``max_cpu_loras``, LRU), and copied into one of
``max_loras`` device slots when a step needs them (:mod:`llmctl.lora.manager`). Every targeted projection adds
``B[slot] @ (A[slot] @ x)`` for its tokens through the ``lora_shrink_expand`` op (a torch reference in core,
overridable per platform), so one batch mixes adapters and the base model.
"""

from llmctl.lora.config import LoRAConfig
from llmctl.lora.request import LoRARequest

__all__ = ["LoRAConfig", "LoRARequest"]
