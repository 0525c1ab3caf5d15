"""Per-request KV bookkeeping on top of the block pool: block tables, prefix lookup, hashing of full blocks.

The manager knows requests only by id: the scheduler passes each request's id, token ids and counts, and reads
the block table back (``block_ids``), so ``kv/`` depends on nothing in the engine. It owns the block tables and
the prefix hashes; the number of computed tokens stays the scheduler's.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llmctl.kv.block_pool import BlockPool, KVBlock
from llmctl.multimodal.inputs import MultiModalFeature, block_extra_keys

_ROOT = b"llmctl-prefix-root"


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    """A block's identity is its tokens *and* everything before it, hence the parent hash in the chain. ``extra``
    holds what the token ids do not say: the content hashes of the images whose placeholders the block holds."""
    h = hashlib.blake2b(parent or _ROOT, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    if extra:
        h.update(b"mm")
        h.update(extra)
    return h.digest()


@dataclass
class PrefixStats:
    queried_tokens: int = 0
    hit_tokens: int = 0


@dataclass
class _RequestBlocks:
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the request's full blocks, in order
    num_registered: int = 0  # prefix of block_ids already in the prefix-cache index


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.stats = PrefixStats()
        self._requests: dict[str, _RequestBlocks] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def add_reached_listener(self, listener: Callable[[int], None] | None) -> None:
        """Call ``listener(n)`` whenever the highest block id handed out grows to ``n - 1`` (``None``: nothing).
        Why: a platform that faults host memory in ahead of use (``Platform.prepare_kv_cache``'s return) follows
        the blocks the workload actually reaches."""
        if listener is not None:
            self.pool.reached_listeners.append(listener)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table: the manager's own list, which later allocations extend and ``trim``
        shortens in place; empty for a request that holds no blocks."""
        entry = self._requests.get(request_id)
        return entry.block_ids if entry is not None else []

    def _update_hashes(self, entry: _RequestBlocks, token_ids: Sequence[int], upto_tokens: int, salt: bytes | None,
                       mm_features: Sequence[MultiModalFeature]) -> None:
        bs = self.block_size
        hashes = entry.block_hashes
        while (len(hashes) + 1) * bs <= upto_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else salt
            extra = block_extra_keys(mm_features, i * bs, (i + 1) * bs) if mm_features else b""
            hashes.append(hash_block(parent, token_ids[i * bs:(i + 1) * bs], extra))

    def find_cached_prefix(self, request_id: str, token_ids: Sequence[int], *, salt: bytes | None = None,
                           mm_features: Sequence[MultiModalFeature] = ()) -> list[KVBlock]:
        """Cached blocks for the longest hashed prefix of ``token_ids``, leaving at least one token to compute
        (the step that computes it is the one that produces logits for the next token). ``salt`` seeds the hash
        chain (requests with other LoRA adapters never share blocks); ``mm_features`` add their images' hashes to
        the blocks their placeholders touch."""
        if not self.enable_prefix_caching:
            return []
        num_tokens = len(token_ids)
        entry = self._requests.setdefault(request_id, _RequestBlocks())
        self._update_hashes(entry, token_ids, num_tokens - 1, salt, mm_features)
        found = []
        for h in entry.block_hashes[: (num_tokens - 1) // self.block_size]:
            block = self.pool.lookup(h)
            if block is None:
                break
            found.append(block)
        return found

    def record_lookup(self, num_tokens: int, hit_blocks: int) -> None:
        self.stats.queried_tokens += num_tokens
        self.stats.hit_tokens += hit_blocks * self.block_size

    def blocks_needed(self, request_id: str, num_computed_tokens: int, num_new_tokens: int,
                      num_cached_blocks: int = 0) -> int:
        total = num_computed_tokens + num_cached_blocks * self.block_size + num_new_tokens
        need = -(-total // self.block_size)
        return max(0, need - len(self.block_ids(request_id)) - num_cached_blocks)

    def can_allocate(self, request_id: str, num_computed_tokens: int, num_new_tokens: int,
                     cached: list[KVBlock] | None = None) -> bool:
        cached = cached or []
        # Reviving a cached block that sits in the free list takes it out of the free count too.
        revived = sum(1 for b in cached if b.ref_cnt == 0)
        need = self.blocks_needed(request_id, num_computed_tokens, num_new_tokens, len(cached))
        return need + revived <= self.pool.num_free

    def allocate(self, request_id: str, num_computed_tokens: int, num_new_tokens: int,
                 cached: list[KVBlock] | None = None) -> bool:
        """Give the request room for ``num_new_tokens`` more tokens after its ``num_computed_tokens`` (and after
        adopting the ``cached`` prefix blocks, whose tokens the caller then counts as computed). Returns False,
        changing nothing, when the pool cannot provide it."""
        cached = cached or []
        if not self.can_allocate(request_id, num_computed_tokens, num_new_tokens, cached):
            return False
        entry = self._requests.setdefault(request_id, _RequestBlocks())
        if cached:
            self.pool.acquire(cached)
            entry.block_ids.extend(b.block_id for b in cached)
            num_computed_tokens += len(cached) * self.block_size
        n = self.blocks_needed(request_id, num_computed_tokens, num_new_tokens)
        if n:
            entry.block_ids.extend(b.block_id for b in self.pool.allocate(n))
        return True

    def cache_computed_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int, *,
                              salt: bytes | None = None, mm_features: Sequence[MultiModalFeature] = ()) -> None:
        """Register every block that is now full of computed tokens under its prefix hash."""
        if not self.enable_prefix_caching:
            return
        entry = self._requests.get(request_id)
        if entry is None:
            return
        full = num_computed_tokens // self.block_size
        self._update_hashes(entry, token_ids, full * self.block_size, salt, mm_features)
        for i in range(entry.num_registered, full):
            self.pool.register(entry.block_ids[i], entry.block_hashes[i])
        entry.num_registered = max(entry.num_registered, full)

    def trim(self, request_id: str, num_computed_tokens: int) -> None:
        """Release the blocks past the one that will hold the request's next token (after rejected draft
        tokens were rolled back, the blocks only they used are empty)."""
        entry = self._requests.get(request_id)
        if entry is None:
            return
        keep = -(-(num_computed_tokens + 1) // self.block_size)
        if len(entry.block_ids) > keep:
            self.pool.release(list(reversed(entry.block_ids[keep:])))
            del entry.block_ids[keep:]

    def free(self, request_id: str) -> None:
        """Give back every block of the request and forget it (a request that holds none frees nothing)."""
        entry = self._requests.pop(request_id, None)
        if entry is not None:
            self.pool.release(list(reversed(entry.block_ids)))
            entry.block_ids.clear()  # a block table still referenced elsewhere shows the request holds nothing
