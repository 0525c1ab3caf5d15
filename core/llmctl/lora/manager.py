"""Which adapters live where: the host cache (``max_cpu_loras``, LRU) and the device slots (``max_loras``).

Adapters are read and checked on the caller's thread (:meth:`LoRAManager.load`), never on the engine loop. The
engine thread only copies a cached adapter into a slot when a step needs it and none holds it
(:meth:`LoRAManager.begin_step`); the scheduler never puts more distinct adapters in one step than there are
slots. A request keeps a reference to its adapter, so unloading or evicting one never breaks a running request.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from llmctl.layers.embedding import LMHead, VocabEmbedding
from llmctl.layers.linear import Linear
from llmctl.lora.adapter import LoRAAdapter, TargetShape, load_adapter
from llmctl.lora.config import LoRAConfig
from llmctl.lora.layers import LoRABatch, LoRAEmbeddingSlots, LoRALinearSlots, Shard, StepMapping
from llmctl.lora.request import LoRARequest
from llmctl.ops import Ops

logger = logging.getLogger(__name__)


def _shards(model: nn.Module, prefix: str, layer: Linear) -> list[Shard]:
    from llmctl.quantization.layers import shard_names

    names = shard_names(model, prefix, layer)
    sizes = getattr(layer, "output_sizes", None) or [layer.out_features]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [Shard(n, o, w) for n, o, w in zip(names, offsets, sizes, strict=True)]


class LoRAManager:
    def __init__(self, model: nn.Module, config: LoRAConfig, ops: Ops, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.config = config
        self.dtype = dtype
        self.mapping = StepMapping()
        self.targets: dict[str, TargetShape] = {}
        self._slotted: list[LoRALinearSlots | LoRAEmbeddingSlots] = []
        self.embedding_name: str | None = None
        n, r = config.max_loras, config.max_lora_rank
        for prefix, module in model.named_modules():
            if isinstance(module, Linear):
                shards = _shards(model, prefix, module)
                module.lora = LoRALinearSlots(shards, module.in_features, n, r, dtype, device, self.mapping,
                                              ops.lora_shrink_expand)
                self._slotted.append(module.lora)
                for s in shards:
                    self.targets[s.name] = TargetShape(module.in_features, s.width)
            elif isinstance(module, VocabEmbedding) and self.embedding_name is None:
                vocab, hidden = module.weight.shape
                module.lora = LoRAEmbeddingSlots(prefix, vocab, hidden, n, r, dtype, device, self.mapping)
                self._slotted.append(module.lora)
                self.targets[prefix] = TargetShape(vocab, hidden)
                self.embedding_name = prefix
            elif isinstance(module, LMHead) and prefix not in self.targets:
                # logits rows are [vocab]: B is [slots, vocab, r], as large as the embedding's A
                vocab, hidden = module.vocab_size, module.hidden_size
                module.lora = LoRALinearSlots([Shard(prefix, 0, vocab)], hidden, n, r, dtype, device,
                                              self.mapping, ops.lora_shrink_expand, on_logits=True)
                self._slotted.append(module.lora)
                self.targets[prefix] = TargetShape(hidden, vocab)
        self._slots: list[LoRAAdapter | None] = [None] * n
        self._slot_lru: OrderedDict[int, None] = OrderedDict()  # slot -> None, least recently used first
        self._cache: OrderedDict[int, LoRAAdapter] = OrderedDict()  # adapter id -> adapter, LRU first
        self._lock = threading.Lock()

    # -- the host side (any thread) ------------------------------------------------------------------------
    def load(self, req: LoRARequest) -> LoRAAdapter:
        """The adapter for ``req``, read and checked once and then cached; raises ``ValueError`` naming the
        adapter and the field at fault."""
        if not isinstance(req, LoRARequest):
            raise ValueError(f"lora_request: expected a LoRARequest, got {type(req).__name__}")
        with self._lock:
            cached = self._cache.get(req.lora_int_id)
            if cached is not None and cached.request == req:
                self._cache.move_to_end(req.lora_int_id)
                return cached
        adapter = load_adapter(req, self.config.max_lora_rank, self.targets, self.embedding_name, self.dtype)
        with self._lock:
            self._cache[req.lora_int_id] = adapter
            self._cache.move_to_end(req.lora_int_id)
            while len(self._cache) > self.config.cpu_cache_size:
                evicted, _ = self._cache.popitem(last=False)
                logger.debug("LoRA adapter %d evicted from the host cache", evicted)
        return adapter

    def remove(self, adapter_id: int) -> bool:
        """Forget an adapter: new requests must load it again; running ones keep their own reference."""
        with self._lock:
            return self._cache.pop(adapter_id, None) is not None

    def cached_ids(self) -> list[int]:
        with self._lock:
            return list(self._cache)

    # -- the device side (the engine thread) -------------------------------------------------------------------
    def _slot_for(self, adapter: LoRAAdapter, busy: set[int]) -> int:
        for slot, held in enumerate(self._slots):
            if held is adapter:
                return slot
        free = [s for s, held in enumerate(self._slots) if held is None and s not in busy]
        if free:
            slot = free[0]
        else:
            slot = next(s for s in self._slot_lru if s not in busy)  # the scheduler keeps a step within max_loras
        for layer in self._slotted:
            layer.set_slot(slot, adapter)
        self._slots[slot] = adapter
        return slot

    def begin_step(self, adapters: Sequence[LoRAAdapter | None], num_tokens: Sequence[int],
                   device: torch.device) -> None:
        """Map this step's tokens to slots (one entry per scheduled request, with its token count)."""
        if all(a is None for a in adapters):
            self.mapping.batch = None
            return
        busy: set[int] = set()
        per_request = []
        for adapter in adapters:
            if adapter is None:
                per_request.append(-1)
                continue
            slot = self._slot_for(adapter, busy)
            busy.add(slot)
            self._slot_lru.pop(slot, None)
            self._slot_lru[slot] = None
            per_request.append(slot)
        slots = torch.tensor(per_request, dtype=torch.int64)
        counts = torch.tensor(list(num_tokens), dtype=torch.int64)
        token_slots = torch.repeat_interleave(slots, counts).to(device)
        self.mapping.batch = LoRABatch(token_slots, tuple(sorted(busy)))

    def end_step(self) -> None:
        self.mapping.batch = None

    def slot_of(self, adapter: LoRAAdapter | None) -> int:
        """The device slot holding ``adapter`` in the current step (-1: the base model)."""
        if adapter is None:
            return -1
        for slot, held in enumerate(self._slots):
            if held is adapter:
                return slot
        raise RuntimeError(f"LoRA adapter {adapter.request.lora_name!r} is in no slot in this step")

    @contextmanager
    def logits_rows(self, rows: torch.Tensor) -> Iterator[None]:
        """Map the rows of a ``compute_logits`` call made inside to the adapters of the step's tokens ``rows``
        (the sampled positions), so the LM head's adapters apply per row."""
        batch = self.mapping.batch
        self.mapping.logits = None if batch is None else LoRABatch(batch.token_slots[rows], batch.active_slots)
        try:
            yield
        finally:
            self.mapping.logits = None

    def logits_for(self, adapter: LoRAAdapter | None,
                   compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``compute_logits`` for rows that all belong to one request of this step (its prompt logprobs)."""
        slot = self.slot_of(adapter)
        if slot < 0:
            return compute_logits

        def run(hidden: torch.Tensor) -> torch.Tensor:
            slots = torch.full((hidden.shape[0],), slot, dtype=torch.int64, device=hidden.device)
            self.mapping.logits = LoRABatch(slots, (slot,))
            try:
                return compute_logits(hidden)
            finally:
                self.mapping.logits = None

        return run
