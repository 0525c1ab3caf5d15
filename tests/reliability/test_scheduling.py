"""Through the server: preemption under a tiny KV cache, batch determinism, and the context-length boundary."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from llmctl_server import ServerSettings

from tests.reliability.conftest import build_engine, record, scaled
from tests.test_server_support import start_server, wait_kv_free


@pytest.fixture()
def live_factory():
    made = []

    def make(model, settings=None, **kw):
        engine = build_engine(model, **kw)
        srv = start_server(engine, settings or ServerSettings(served_model_names=["tiny"]))
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.stop()
        srv.engine.shutdown()


def _prompt(i: int) -> str:
    return f"Request number {i}: " + " ".join(["lorem", "ipsum", "dolor", "sit", "amet"][: 1 + i % 5]) * (1 + i % 3)


async def _post_all(url: str, bodies: list[dict], timeout: float = 240) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout), limits=limits) as c:
        return await asyncio.wait_for(asyncio.gather(*[c.post("/v1/completions", json=b) for b in bodies]), timeout)


def _post_until_preempted(srv, bodies: list[dict], rounds: int = 3) -> tuple[list[httpx.Response], int]:
    """Sends ``bodies`` at once, again (up to ``rounds`` times) while none was preempted: the requests must be in
    the engine together to exhaust its KV cache, and on a loaded host the client can send them so far apart that
    the first ones end before the last arrive. Returns the last round's answers (all 200) and its preemptions."""
    for _ in range(rounds):
        before = srv.engine.get_stats()["num_preemptions"]
        together = asyncio.run(_post_all(srv.url, bodies))
        assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200][:2]
        preemptions = srv.engine.get_stats()["num_preemptions"] - before
        if preemptions:
            break
    return together, preemptions


def test_preemption_completes_all_and_matches_one_at_a_time(live_factory, tiny_llama_dir):
    n, max_tokens = scaled(64, 256), 40
    probe = build_engine(tiny_llama_dir)
    bytes_per_block = (32 << 20) // probe.get_stats()["kv_blocks_total"]
    probe.shutdown()
    blocks = 16  # a sequence needs up to 4 blocks (<= 16 prompt + 40 generated tokens): a few sequences fit
    srv = live_factory(tiny_llama_dir, kv_cache_memory=blocks * bytes_per_block)
    stats = srv.engine.get_stats()
    assert stats["kv_blocks_total"] == blocks
    bodies = [{"model": "tiny", "prompt": _prompt(i), "max_tokens": max_tokens, "temperature": 0,
               "ignore_eos": True} for i in range(n)]
    together, preemptions = _post_until_preempted(srv, bodies)
    wait_kv_free(srv.engine)
    alone = []
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for b in bodies:
            alone.append(c.post("/v1/completions", json=b).json()["choices"][0]["text"])
    got = [r.json()["choices"][0] for r in together]
    assert all(ch["finish_reason"] == "length" for ch in got)
    mismatches = sum(ch["text"] != a for ch, a in zip(got, alone, strict=True))
    record("preemption", requests=n, kv_blocks_total=blocks, preemptions=preemptions, mismatches=mismatches)
    assert preemptions > 0, "the KV cache was not small enough to preempt"
    assert mismatches == 0


def test_batch_determinism_under_random_traffic(live_factory, tiny_llama_dir):
    srv = live_factory(tiny_llama_dir)
    rng = random.Random(7)
    copies = 32
    same = {"model": "tiny", "prompt": "The same greedy request, every time:", "max_tokens": 24, "temperature": 0}
    others = [{"model": "tiny", "prompt": _prompt(rng.randint(0, 999)), "max_tokens": rng.randint(1, 40),
               "temperature": rng.choice([0, 0.7, 1.2]), "top_k": rng.choice([-1, 5, 50]), "seed": rng.randint(0, 9)}
              for _ in range(scaled(32, 128))]
    bodies = [dict(same) for _ in range(copies)] + others
    order = list(range(len(bodies)))
    rng.shuffle(order)
    responses = asyncio.run(_post_all(srv.url, [bodies[i] for i in order]))
    by_index = {i: r for i, r in zip(order, responses, strict=True)}
    assert all(r.status_code == 200 for r in responses)
    texts = [by_index[i].json()["choices"][0]["text"] for i in range(copies)]
    record("batch_determinism", copies=copies, other_requests=len(others), distinct_outputs=len(set(texts)))
    assert len(set(texts)) == 1, set(texts)


def test_context_boundary_sweep(live_factory, tiny_llama_dir):
    srv = live_factory(tiny_llama_dir)
    limit = srv.engine.model_config.max_model_len
    prompt_ids = list(range(5, 5 + 20))
    n_prompt = len(prompt_ids)
    outcomes = {}
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        for label, mt in (("limit-1", limit - n_prompt - 1), ("limit", limit - n_prompt),
                          ("limit+1", limit - n_prompt + 1)):
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": prompt_ids, "max_tokens": mt,
                                                "ignore_eos": True, "temperature": 0})
            outcomes[label] = r.status_code
            if label != "limit+1":
                assert r.status_code == 200, r.text
                assert len(r.json()["choices"][0]["text"]) > 0
                assert r.json()["usage"]["completion_tokens"] == mt
            else:
                assert r.status_code == 400, r.text
                msg = r.json()["error"]["message"]
                assert str(limit) in msg and str(n_prompt + mt) in msg and str(n_prompt) in msg, msg
        # a prompt that alone fills the context leaves no room to generate
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": list(range(5, 5 + limit))})
        assert r.status_code == 400 and str(limit) in r.json()["error"]["message"]
    record("context_boundary", max_model_len=limit, prompt_tokens=n_prompt, outcomes=outcomes)


def test_kv_exhaustion_hostile_mix_stays_correct(live_factory, tiny_llama_dir):
    """Long prompts with n=16 and high max_tokens beside short requests, on a KV cache far too small for them
    at once: preemption must keep every sequence of every request equal to the request served alone."""
    probe = build_engine(tiny_llama_dir)
    bytes_per_block = (32 << 20) // probe.get_stats()["kv_blocks_total"]
    probe.shutdown()
    blocks = 96  # one n=16 request needs up to 16 x 5 blocks: two of them cannot run together
    # Every step may carry prompt chunks (no decode-only step between them, which is opt-in): the mix's prompts
    # are then admitted as fast as the KV cache allows, which is what drives it into exhaustion here.
    srv = live_factory(tiny_llama_dir, kv_cache_memory=blocks * bytes_per_block,
                       min_decode_steps_between_prefills=0)
    long_prompt = " ".join(["lorem", "ipsum", "dolor", "sit", "amet"] * 5)  # ~25 tokens
    bodies = [{"model": "tiny", "prompt": f"{i} {long_prompt}", "max_tokens": 48, "n": 16, "temperature": 0,
               "ignore_eos": True} for i in range(scaled(3, 12))]
    bodies += [{"model": "tiny", "prompt": _prompt(i), "max_tokens": 24, "temperature": 0, "ignore_eos": True}
               for i in range(scaled(8, 32))]
    together, preemptions = _post_until_preempted(srv, bodies)
    wait_kv_free(srv.engine)
    mismatches = 0
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        for b, r in zip(bodies, together, strict=True):
            alone = [ch["text"] for ch in c.post("/v1/completions", json=b).json()["choices"]]
            got = [ch["text"] for ch in r.json()["choices"]]
            assert all(ch["finish_reason"] == "length" for ch in r.json()["choices"])
            mismatches += sum(a != g for a, g in zip(alone, got, strict=True))
    record("kv_exhaustion_hostile_mix", requests=len(bodies), sequences=sum(b.get("n", 1) for b in bodies),
           kv_blocks_total=blocks, preemptions=preemptions, mismatches=mismatches)
    assert preemptions > 0, "the KV cache was not small enough to preempt"
    assert mismatches == 0
    wait_kv_free(srv.engine)
