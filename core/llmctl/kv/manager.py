"""Per-request KV bookkeeping on top of the block pool: block tables, prefix lookup, hashing of full blocks."""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from llmctl.engine.request import Request
from llmctl.kv.block_pool import BlockPool, KVBlock
from llmctl.multimodal.inputs import block_extra_keys

_ROOT = b"llmctl-prefix-root"


def hash_block(parent: bytes | None, token_ids: list[int], extra: bytes = b"") -> bytes:
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


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.stats = PrefixStats()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def _update_hashes(self, request: Request, upto_tokens: int) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        while (len(hashes) + 1) * bs <= upto_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else request.cache_salt
            extra = block_extra_keys(request.mm_features, i * bs, (i + 1) * bs) if request.mm_features else b""
            hashes.append(hash_block(parent, request.all_token_ids[i * bs:(i + 1) * bs], extra))

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """Cached blocks for the longest hashed prefix, leaving at least one token to compute (the step that
        computes it is the one that produces logits for the next token)."""
        if not self.enable_prefix_caching:
            return []
        self._update_hashes(request, request.num_tokens - 1)
        found = []
        for h in request.block_hashes[: (request.num_tokens - 1) // self.block_size]:
            block = self.pool.lookup(h)
            if block is None:
                break
            found.append(block)
        return found

    def record_lookup(self, request: Request, hit_blocks: int) -> None:
        self.stats.queried_tokens += request.num_tokens
        self.stats.hit_tokens += hit_blocks * self.block_size

    def blocks_needed(self, request: Request, num_new_tokens: int, num_cached_blocks: int = 0) -> int:
        total = request.num_computed_tokens + num_cached_blocks * self.block_size + num_new_tokens
        need = -(-total // self.block_size)
        return max(0, need - len(request.block_ids) - num_cached_blocks)

    def can_allocate(self, request: Request, num_new_tokens: int, cached: list[KVBlock] | None = None) -> bool:
        cached = cached or []
        # Reviving a cached block that sits in the free list takes it out of the free count too.
        revived = sum(1 for b in cached if b.ref_cnt == 0)
        return self.blocks_needed(request, num_new_tokens, len(cached)) + revived <= self.pool.num_free

    def allocate(self, request: Request, num_new_tokens: int, cached: list[KVBlock] | None = None) -> bool:
        """Give ``request`` room for ``num_new_tokens`` more tokens (after adopting ``cached`` prefix blocks).
        Returns False, changing nothing, when the pool cannot provide it."""
        cached = cached or []
        if not self.can_allocate(request, num_new_tokens, cached):
            return False
        if cached:
            self.pool.acquire(cached)
            request.block_ids.extend(b.block_id for b in cached)
            request.num_computed_tokens += len(cached) * self.block_size
        n = self.blocks_needed(request, num_new_tokens)
        if n:
            request.block_ids.extend(b.block_id for b in self.pool.allocate(n))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Register every block that is now full of computed tokens under its prefix hash."""
        if not self.enable_prefix_caching:
            return
        full = request.num_computed_tokens // self.block_size
        self._update_hashes(request, full * self.block_size)
        for i in range(request.num_registered_blocks, full):
            self.pool.register(request.block_ids[i], request.block_hashes[i])
        request.num_registered_blocks = max(request.num_registered_blocks, full)

    def trim(self, request: Request) -> None:
        """Release the blocks past the one that will hold the request's next token (after rejected draft
        tokens were rolled back, the blocks only they used are empty)."""
        keep = -(-(request.num_computed_tokens + 1) // self.block_size)
        if len(request.block_ids) > keep:
            self.pool.release(list(reversed(request.block_ids[keep:])))
            del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        self.pool.release(list(reversed(request.block_ids)))
        request.block_ids = []
        request.num_registered_blocks = 0
