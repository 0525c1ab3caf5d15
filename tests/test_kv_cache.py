"""BlockPool / KVCacheManager units: reference counts, LRU eviction of cached free blocks, the hash chain."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
from llmctl.kv.block_pool import BlockPool
from llmctl.kv.manager import KVCacheManager, hash_block

BS = 4


@dataclass
class Seq:
    """What the scheduler tracks of one request, as far as the KV manager is concerned: its id, its token ids
    and how many of them are computed."""

    rid: str
    tokens: list[int]
    computed: int = 0


def compute(kv: KVCacheManager, s: Seq, n: int | None = None) -> None:
    """What the scheduler does for one step: allocate, then count the tokens computed and cache full blocks."""
    cached = kv.find_cached_prefix(s.rid, s.tokens) if s.computed == 0 else []
    n = len(s.tokens) - s.computed - len(cached) * BS if n is None else n
    assert kv.allocate(s.rid, s.computed, n, cached)
    kv.record_lookup(len(s.tokens), len(cached))
    s.computed += len(cached) * BS + n
    kv.cache_computed_blocks(s.rid, s.tokens, s.computed)


def test_ref_counts_and_double_free():
    pool = BlockPool(4, enable_caching=True)
    a = pool.allocate(2)
    assert [b.ref_cnt for b in a] == [1, 1] and pool.num_free == 2
    pool.acquire([a[0]])
    assert a[0].ref_cnt == 2
    pool.release([a[0].block_id])
    assert a[0].ref_cnt == 1 and pool.num_free == 2
    pool.release([a[0].block_id, a[1].block_id])
    assert pool.num_free == 4
    with pytest.raises(AssertionError, match="double free"):
        pool.release([a[0].block_id])
    assert pool.num_free == 4
    with pytest.raises(AssertionError):
        pool.allocate(5)


def test_lru_eviction_order_of_cached_free_blocks():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.allocate(4)
    for i, b in enumerate(blocks):
        pool.register(b.block_id, bytes([i]) * 16)
    # Freed in the order 2, 0, 3, 1: that is the eviction order.
    pool.release([blocks[2].block_id, blocks[0].block_id, blocks[3].block_id, blocks[1].block_id])
    # Reviving block 0 takes it out of the LRU list; it is not evicted while in use.
    pool.acquire([pool.lookup(bytes([0]) * 16)])
    first = pool.allocate(1)[0]
    assert first.block_id == blocks[2].block_id
    assert pool.lookup(bytes([2]) * 16) is None  # its cached content was evicted
    assert pool.lookup(bytes([3]) * 16) is not None and pool.lookup(bytes([1]) * 16) is not None
    second = pool.allocate(1)[0]
    assert second.block_id == blocks[3].block_id
    # Freeing block 0 again puts it at the most-recent end, behind block 1.
    pool.release([blocks[0].block_id])
    assert pool.allocate(1)[0].block_id == blocks[1].block_id
    assert pool.allocate(1)[0].block_id == blocks[0].block_id
    assert pool.num_free == 0


def test_hash_chain_includes_parent():
    tokens = [1, 2, 3, 4]
    assert hash_block(None, tokens) == hash_block(None, list(tokens))
    assert hash_block(None, tokens) != hash_block(hash_block(None, [9, 9, 9, 9]), tokens)
    assert hash_block(hash_block(None, [5, 6, 7, 8]), tokens) != hash_block(hash_block(None, [5, 6, 7, 9]), tokens)
    assert hash_block(None, tokens) != hash_block(None, [1, 2, 3, 5])

    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    a = Seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(kv, a)
    kv.free("a")
    # Same second block, different first block: nothing may be reused (the second block's hash differs).
    assert kv.find_cached_prefix("b", [0, 2, 3, 4, 5, 6, 7, 8, 9]) == []
    # Same first block only: one block reused.
    found = kv.find_cached_prefix("c", [1, 2, 3, 4, 0, 6, 7, 8, 9])
    assert [blk.block_id for blk in found] == [kv.pool.lookup(hash_block(None, [1, 2, 3, 4])).block_id]
    # The full prefix: both full blocks reused, the last token is always left to compute.
    assert len(kv.find_cached_prefix("d", [1, 2, 3, 4, 5, 6, 7, 8, 9])) == 2
    assert len(kv.find_cached_prefix("e", [1, 2, 3, 4, 5, 6, 7, 8])) == 1
    # A salt (a LoRA adapter's) starts another chain: the same tokens find nothing.
    assert kv.find_cached_prefix("f", [1, 2, 3, 4, 5, 6, 7, 8, 9], salt=b"lora:1") == []


def test_shared_prefix_ref_counts_and_all_free_at_end():
    kv = KVCacheManager(8, BS, enable_prefix_caching=True)
    prompt = list(range(10, 19))  # 2 full blocks + 1 token
    a = Seq("a", prompt)
    compute(kv, a)
    b = Seq("b", prompt)
    compute(kv, b)
    assert kv.stats.hit_tokens == 2 * BS and b.computed == len(prompt)
    a_blocks, b_blocks = kv.block_ids("a"), kv.block_ids("b")
    assert b_blocks[:2] == a_blocks[:2] and b_blocks[2] != a_blocks[2]
    assert [kv.pool.blocks[i].ref_cnt for i in a_blocks] == [2, 2, 1]
    assert kv.num_free_blocks == 8 - 4
    kv.free("a")
    assert a_blocks == []  # a table someone still holds shows the request holds nothing
    assert [kv.pool.blocks[i].ref_cnt for i in b_blocks] == [1, 1, 1]
    assert kv.num_free_blocks == 8 - 3
    kv.free("b")
    assert kv.num_free_blocks == 8
    assert all(blk.ref_cnt == 0 for blk in kv.pool.blocks)
    kv.free("b")  # a request with no blocks frees nothing, and is not a double free
    assert kv.num_free_blocks == 8


def test_allocate_fails_without_side_effects():
    kv = KVCacheManager(3, BS, enable_prefix_caching=True)
    compute(kv, Seq("a", list(range(8))))
    kv.free("a")
    tokens = list(range(8)) + list(range(100, 104)) + [7]  # needs 4 blocks, reuses 2 cached
    cached = kv.find_cached_prefix("b", tokens)
    assert len(cached) == 2
    assert not kv.allocate("b", 0, 5, cached)
    assert kv.block_ids("b") == [] and kv.num_free_blocks == 3
    assert all(blk.ref_cnt == 0 for blk in kv.pool.blocks)
    assert kv.allocate("b", 0, 4, cached)
    assert kv.num_free_blocks == 0 and kv.block_ids("b")[:2] == [blk.block_id for blk in cached]


def test_block_table_grows_and_trims_in_place():
    """The table ``block_ids`` returns is the one later calls change, so a request that holds it (the runner
    reads it there) always sees its current blocks."""
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    assert kv.allocate("a", 0, 5)
    table = kv.block_ids("a")
    assert len(table) == 2
    assert kv.allocate("a", 5, 6)  # 11 tokens: 3 blocks
    assert table is kv.block_ids("a") and len(table) == 3
    kv.trim("a", 5)  # rejected drafts rolled back to 5 computed: the next token goes in block 2
    assert len(table) == 2 and kv.num_free_blocks == 6


def test_caching_disabled_never_hits():
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    compute(kv, Seq("a", list(range(9))))
    kv.free("a")
    b = Seq("b", list(range(9)))
    assert kv.find_cached_prefix("b", b.tokens) == []
    compute(kv, b)
    assert kv.stats.hit_tokens == 0
    kv.free("b")
    assert kv.num_free_blocks == 8


def test_kv_does_not_import_the_engine():
    """The KV manager takes ids and token lists: ``kv/`` must not depend on the engine's request type."""
    code = "import sys, llmctl.kv.manager; print(sorted(m for m in sys.modules if m.startswith('llmctl.engine')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_reached_listeners_hear_the_frontier_grow_and_only_then():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    heard: list[int] = []
    kv.add_reached_listener(heard.append)
    kv.add_reached_listener(None)  # a platform without a listener
    a, b = Seq("a", list(range(10))), Seq("b", list(range(100, 106)))
    compute(kv, a)  # 3 blocks: ids 0..2
    compute(kv, b)  # 2 blocks: ids 3..4
    assert heard == [3, 5] and kv.pool.reached == 5
    kv.free("a")
    kv.free("b")
    compute(kv, Seq("c", list(range(200, 204))))  # fresh ids first (the freed ones wait at the LRU tail): id 5
    assert heard == [3, 5, 6]
    for i in range(4):  # the remaining 4 fresh ids, then freed ones: the frontier stops at the cache's end
        compute(kv, Seq(f"d{i}", list(range(300 + 8 * i, 308 + 8 * i))))
    assert heard[-1] == 10 and kv.pool.reached == 10
    assert heard == sorted(set(heard))  # strictly growing, one call per growth
