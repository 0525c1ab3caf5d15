"""BlockPool / KVCacheManager units: reference counts, LRU eviction of cached free blocks, the hash chain."""

from __future__ import annotations

import pytest
from llmctl.engine.request import Request
from llmctl.kv.block_pool import BlockPool
from llmctl.kv.manager import KVCacheManager, hash_block
from llmctl.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=8), arrival_time=0.0, max_tokens=8)


def compute(kv: KVCacheManager, req: Request, n: int | None = None) -> None:
    """What the scheduler + core do for one step: allocate, then mark computed and cache full blocks."""
    cached = kv.find_cached_prefix(req) if req.num_computed_tokens == 0 else []
    n = req.num_tokens - req.num_computed_tokens - len(cached) * BS if n is None else n
    assert kv.allocate(req, n, cached)
    kv.record_lookup(req, len(cached))
    req.num_computed_tokens += n
    kv.cache_computed_blocks(req)


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
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(kv, a)
    kv.free(a)
    # Same second block, different first block: nothing may be reused (the second block's hash differs).
    b = make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.find_cached_prefix(b) == []
    # Same first block only: one block reused.
    c = make_request("c", [1, 2, 3, 4, 0, 6, 7, 8, 9])
    assert [blk.block_id for blk in kv.find_cached_prefix(c)] == [kv.pool.lookup(a.block_hashes[0]).block_id]
    # The full prefix: both full blocks reused, the last token is always left to compute.
    d = make_request("d", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(kv.find_cached_prefix(d)) == 2
    e = make_request("e", [1, 2, 3, 4, 5, 6, 7, 8])
    assert len(kv.find_cached_prefix(e)) == 1


def test_shared_prefix_ref_counts_and_all_free_at_end():
    kv = KVCacheManager(8, BS, enable_prefix_caching=True)
    prompt = list(range(10, 19))  # 2 full blocks + 1 token
    a = make_request("a", prompt)
    compute(kv, a)
    b = make_request("b", prompt)
    compute(kv, b)
    assert kv.stats.hit_tokens == 2 * BS and b.num_computed_tokens == len(prompt)
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert [kv.pool.blocks[i].ref_cnt for i in a.block_ids] == [2, 2, 1]
    assert kv.num_free_blocks == 8 - 4
    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in b.block_ids] == [1, 1, 1]
    assert kv.num_free_blocks == 8 - 3
    kv.free(b)
    assert kv.num_free_blocks == 8
    assert all(blk.ref_cnt == 0 for blk in kv.pool.blocks)
    kv.free(b)  # a request with no blocks frees nothing, and is not a double free
    assert kv.num_free_blocks == 8


def test_allocate_fails_without_side_effects():
    kv = KVCacheManager(3, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(8)))
    compute(kv, a)
    kv.free(a)
    b = make_request("b", list(range(8)) + list(range(100, 104)) + [7])  # needs 4 blocks, reuses 2 cached
    cached = kv.find_cached_prefix(b)
    assert len(cached) == 2
    assert not kv.allocate(b, 5, cached)
    assert b.block_ids == [] and b.num_computed_tokens == 0 and kv.num_free_blocks == 3
    assert all(blk.ref_cnt == 0 for blk in kv.pool.blocks)
    assert kv.allocate(b, 4, cached)
    assert kv.num_free_blocks == 0 and b.num_computed_tokens == 8


def test_caching_disabled_never_hits():
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    compute(kv, a)
    kv.free(a)
    b = make_request("b", list(range(9)))
    assert kv.find_cached_prefix(b) == []
    compute(kv, b)
    assert kv.stats.hit_tokens == 0
    kv.free(b)
    assert kv.num_free_blocks == 8
