"""The pool of physical KV blocks: free list in LRU order, reference counts, and the prefix-hash index.

A block whose reference count drops to zero keeps its hash and stays findable until it is handed out again,
so a later request with the same prefix can revive it (automatic prefix caching). Free blocks are handed out
from the least recently freed end, which makes that the eviction order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory: too small for even one KV block (got {num_blocks} blocks)")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        # One past the highest block id ever handed out: fresh ids go out in order, so this is how far into the
        # cache the workload has reached. Listeners (the platform's prefaulter) hear each time it grows.
        self.reached = 0
        self.reached_listeners: list[Callable[[int], None]] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        """Take ``n`` free blocks (evicting their cached contents). Caller checks ``num_free`` first."""
        assert n <= len(self._free), "allocate() past the free count"
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) == block_id:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        top = max((b.block_id for b in out), default=-1) + 1
        if top > self.reached:
            self.reached = top
            for listener in self.reached_listeners:
                listener(top)
        return out

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        block_id = self._cached.get(block_hash)
        return None if block_id is None else self.blocks[block_id]

    def acquire(self, blocks: list[KVBlock]) -> None:
        """Take a reference on cached blocks found by ``lookup`` (reviving them from the free list)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference each. Pass a request's blocks tail first: the tail of a prefix is the least
        likely to be shared, so it should be evicted first."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_cnt > 0, f"double free of block {block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None

    def register(self, block_id: int, block_hash: bytes) -> None:
        """Make a full, computed block findable by its prefix hash (first writer wins on duplicates)."""
        if not self.enable_caching:
            return
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, block_id)
