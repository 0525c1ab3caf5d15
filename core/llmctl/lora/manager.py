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
from llmctl.layers.parallel import RowParallelLinear
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


Span = tuple[int, int]  # (start, length) in the checkpoint tensor's dimension


class LoRAHostCache:
    """The host side: adapters read and checked against the model's full (unsplit) shapes on the caller's thread,
    then kept (``max_cpu_loras``, LRU). ``split`` turns a checked adapter into this rank's slices (tensor
    parallelism); the ``mp`` driver, which holds no model, keeps whole adapters only to check them."""

    def __init__(self, config: LoRAConfig, targets: dict[str, TargetShape], embedding_name: str | None,
                 dtype: torch.dtype, split: Callable[[LoRAAdapter], LoRAAdapter] | None = None) -> None:
        self.config = config
        self.targets = targets
        self.embedding_name = embedding_name
        self.dtype = dtype
        self._split = split
        self._cache: OrderedDict[int, LoRAAdapter] = OrderedDict()  # adapter id -> adapter, LRU first
        self._lock = threading.Lock()

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
        if self._split is not None:
            adapter = self._split(adapter)
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


class LoRAManager:
    def __init__(self, model: nn.Module, config: LoRAConfig, ops: Ops, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.config = config
        self.dtype = dtype
        self.mapping = StepMapping()
        self.targets: dict[str, TargetShape] = {}
        # tensor parallelism: checkpoint name -> (A's input columns, B's output rows) this rank keeps, or None
        self._spans: dict[str, tuple[Span | None, Span | None]] = {}
        self._slotted: list[LoRALinearSlots | LoRAEmbeddingSlots] = []
        self.embedding_name: str | None = None
        n, r = config.max_loras, config.max_lora_rank
        for prefix, module in model.named_modules():
            if isinstance(module, Linear):
                shards = _shards(model, prefix, module)
                module.lora = LoRALinearSlots(shards, module.in_features, n, r, dtype, device, self.mapping,
                                              ops.lora_shrink_expand)
                self._slotted.append(module.lora)
                self._add_linear_targets(module, shards)
            elif isinstance(module, VocabEmbedding) and self.embedding_name is None:
                # full vocabulary on every rank: the delta is added after a split embedding's all-reduce
                vocab, hidden = module.vocab_size, module.weight.shape[1]
                module.lora = LoRAEmbeddingSlots(prefix, vocab, hidden, n, r, dtype, device, self.mapping)
                self._slotted.append(module.lora)
                self.targets[prefix] = TargetShape(vocab, hidden)
                self.embedding_name = prefix
            elif isinstance(module, LMHead) and prefix not in self.targets:
                # logits rows are [vocab]: B is [slots, vocab, r], as large as the embedding's A; a split head
                # adds the delta after gathering the logits, so it too holds the full vocabulary
                vocab, hidden = module.vocab_size, module.hidden_size
                module.lora = LoRALinearSlots([Shard(prefix, 0, vocab)], hidden, n, r, dtype, device,
                                              self.mapping, ops.lora_shrink_expand, on_logits=True)
                self._slotted.append(module.lora)
                self.targets[prefix] = TargetShape(hidden, vocab)
        self.host = LoRAHostCache(config, self.targets, self.embedding_name, dtype,
                                  self._split if self._spans else None)
        self._slots: list[LoRAAdapter | None] = [None] * n
        self._slot_lru: OrderedDict[int, None] = OrderedDict()  # slot -> None, least recently used first

    def _add_linear_targets(self, module: Linear, shards: list[Shard]) -> None:
        """The full checkpoint shapes an adapter is checked against, and what this rank keeps of a split layer:
        a column-split layer (q/k/v, gate/up) keeps its rows of B, a row-split one (o_proj, down_proj) its
        columns of A, whose partial delta joins the layer's partial sum before the all-reduce."""
        tp = getattr(module, "tp", None)
        split = tp is not None and tp.size > 1
        row_split = split and isinstance(module, RowParallelLinear)
        full_in = module.in_features * tp.size if row_split else module.in_features
        cols = (tp.rank * module.in_features, module.in_features) if row_split else None
        full_sizes = getattr(module, "full_output_sizes", None) if split else None
        for i, s in enumerate(shards):
            rows = (module.shard_starts[i], s.width) if full_sizes is not None else None
            self.targets[s.name] = TargetShape(full_in, full_sizes[i] if full_sizes is not None else s.width)
            if cols is not None or rows is not None:
                self._spans[s.name] = (cols, rows)

    def _split(self, adapter: LoRAAdapter) -> LoRAAdapter:
        part = LoRAAdapter(adapter.request, adapter.rank)
        for name, (a, b) in adapter.weights.items():
            cols, rows = self._spans.get(name, (None, None))
            if cols is not None:
                a = a[:, cols[0]:cols[0] + cols[1]].contiguous()
            if rows is not None:
                b = b[rows[0]:rows[0] + rows[1]].contiguous()
            part.weights[name] = (a, b)
        return part

    # -- the host side (any thread) ------------------------------------------------------------------------
    def load(self, req: LoRARequest) -> LoRAAdapter:
        return self.host.load(req)

    def remove(self, adapter_id: int) -> bool:
        return self.host.remove(adapter_id)

    def cached_ids(self) -> list[int]:
        return self.host.cached_ids()

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
