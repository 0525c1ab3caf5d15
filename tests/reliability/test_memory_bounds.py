"""Per-request state the server keeps across requests stays bounded (the soak's RssAnon limit, docs/reliability.md)."""

from __future__ import annotations

from llmctl_server.tokens import TOKEN_CACHE_ENTRIES, TokenText


class _WideTokenizer:
    """A tokenizer whose every id is a distinct token, like a 49k vocabulary seen through many logprobs."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return f"<t{ids[0]}>"

    def convert_ids_to_tokens(self, tid: int) -> str:
        return f"<t{tid}>"


def test_token_text_caches_stay_bounded_as_new_tokens_appear():
    tt = TokenText(_WideTokenizer())
    seen = 20_000  # more distinct tokens than the hot set: a long run with sampled tokens and top-k logprobs
    for tid in range(seen):
        assert tt.text(tid) == f"<t{tid}>"
        assert tt.bytes(tid) == list(f"<t{tid}>".encode())
    assert tt.text_of.cache_info().currsize <= TOKEN_CACHE_ENTRIES < seen // 4
    assert tt.bytes_of.cache_info().currsize <= TOKEN_CACHE_ENTRIES
    assert tt.text(7) == "<t7>"  # evicted entries are recomputed, not lost


def test_prefix_cache_index_and_request_tables_stay_bounded_by_the_block_count():
    """Every request of a long run registers new prefix hashes (the soak's prompts are random): the index may hold
    at most one hash per block, and a finished request leaves nothing in the manager, so what the KV manager
    holds at idle is set by the cache size, not by how many requests it served (docs/reliability.md, soak)."""
    import random

    from llmctl.kv.manager import KVCacheManager

    num_blocks, bs = 64, 4
    kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=True)
    rng = random.Random(0)
    sizes = []
    for i in range(2_000):
        rid = f"r{i}"
        tokens = [rng.randrange(50_000) for _ in range(rng.randint(1, 40))]
        cached = kv.find_cached_prefix(rid, tokens)
        if kv.allocate(rid, 0, len(tokens) - len(cached) * bs, cached):
            kv.cache_computed_blocks(rid, tokens, len(tokens))
        kv.free(rid)  # finished, or aborted while waiting (it looked up its prefix, never got blocks)
        sizes.append(len(kv.pool._cached))
    assert max(sizes) <= num_blocks
    assert sizes[-1] > num_blocks // 2  # the index did fill: the bound above was exercised
    assert kv.num_free_blocks == num_blocks and not kv._requests


class _IdleEngine:
    """Just enough of an ``LLMEngine`` for ``AsyncLLM``'s loop: one step of work when told, else idle."""

    tokenizer = model_config = None

    def __init__(self) -> None:
        self.work = 0

    def get_stats(self) -> dict:
        return {}

    def has_unfinished_requests(self) -> bool:
        return self.work > 0

    def step(self) -> list:
        self.work -= 1
        return []


def test_idle_engine_trims_malloc_again_for_what_is_freed_after_its_last_step(monkeypatch):
    import time

    from llmctl import EngineArgs
    from llmctl.engine import async_llm

    trims: list[float] = []
    monkeypatch.setattr(async_llm, "malloc_trim", lambda pad: trims.append(time.monotonic()))
    monkeypatch.setattr(async_llm, "_TRIM_AFTER_IDLE_S", 0.02)
    monkeypatch.setattr(async_llm, "_RETRIM_EVERY_S", 0.05)
    monkeypatch.setattr(async_llm, "_RETRIMS", 3)
    fake = _IdleEngine()
    engine = async_llm.AsyncLLM(EngineArgs(model="unused"), engine=fake)
    try:
        time.sleep(0.3)
        assert trims == []  # never busy: nothing to hand back
        fake.work = 1
        engine._wake.set()
        deadline = time.monotonic() + 10
        while len(trims) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert len(trims) == 1 + 3  # the trim after the busy period, then the later ones, then none
        assert all(b - a >= 0.05 for a, b in zip(trims[1:], trims[2:]))
    finally:
        engine.shutdown()


def test_worker_threads_start_together_and_no_thread_starts_later():
    """The server's default executor: every thread started (and warmed) before the first request, so a burst of
    overlapping ``asyncio.to_thread`` calls later starts none (a thread starting mid-run was a step of RssAnon
    growth in the soak)."""
    import asyncio
    import threading
    import time

    from llmctl_server.worker_threads import start_worker_threads

    warmed: set[int] = set()

    async def main() -> tuple[int, int, set[int]]:
        pool = start_worker_threads(asyncio.get_running_loop(), lambda: warmed.add(threading.get_ident()), count=4)
        before = threading.active_count()
        used = await asyncio.gather(*(asyncio.to_thread(lambda: (time.sleep(0.02), threading.get_ident())[1])
                                      for _ in range(16)))
        after = threading.active_count()
        pool.shutdown(wait=True)
        return before, after, set(used)

    before, after, used = asyncio.run(main())
    assert len(warmed) == 4  # four distinct threads ran the warm-up
    assert after == before and used <= warmed  # the burst ran on them; no thread started
