"""Scheduling behaviour: batch invariance under chunked prefill and preemption, prefix caching, n > 1, and KV
block accounting after every way a request can end."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from llmctl import LLM, SamplingParams
from llmctl.engine.async_llm import AsyncLLM

from tests._engine_util import _single_thread, assert_all_blocks_free  # noqa: F401

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
PROMPTS = [f"Request {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + (i * 5) % 37))
           for i in range(32)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def bytes_per_block(model_dir, block_size: int = 16) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * block_size * cfg["num_key_value_heads"] * head * 4  # fp32


@pytest.fixture(scope="module")
def roomy(tiny_llama_dir):
    """Plenty of KV and a large token budget: every request alone is one prefill plus decodes."""
    return LLM(str(tiny_llama_dir), dtype="float32", num_threads=1,
               kv_cache_memory=256 * bytes_per_block(tiny_llama_dir), enable_prefix_caching=False)


@pytest.fixture(scope="module")
def tight(tiny_llama_dir):
    """A KV cache of 24 blocks and a 32-token budget: chunked prefill and preemption under load."""
    return LLM(str(tiny_llama_dir), dtype="float32", num_threads=1,
               kv_cache_memory=24 * bytes_per_block(tiny_llama_dir), max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def alone_outputs(roomy):
    return [roomy.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


def test_batch_invariance_with_chunked_prefill_and_preemption(tight, alone_outputs):
    tok = tight.get_tokenizer()
    assert max(len(tok.encode(p)) for p in PROMPTS) > 32  # some prompts need several prefill chunks
    before = tight.get_stats()
    outs = tight.generate(PROMPTS, GREEDY, use_tqdm=False)
    after = tight.get_stats()
    assert after["num_preemptions"] > before["num_preemptions"], "the test must force preemption"
    for i, (out, alone) in enumerate(zip(outs, alone_outputs)):
        assert out.finished and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == alone, f"request {i} differs when batched"
    assert_all_blocks_free(after)


def test_preemption_mixed_lengths_all_complete(tight, roomy):
    params = [SamplingParams(temperature=0.0, max_tokens=8 + (i * 13) % 40, ignore_eos=True) for i in range(24)]
    before = tight.get_stats()["num_preemptions"]
    outs = tight.generate(PROMPTS[:24], params, use_tqdm=False)
    assert tight.get_stats()["num_preemptions"] > before
    for p, sp, out in zip(PROMPTS, params, outs):
        ref = roomy.generate(p, sp, use_tqdm=False)[0].outputs[0]
        assert out.outputs[0].token_ids == ref.token_ids and len(ref.token_ids) == sp.max_tokens
        assert out.outputs[0].text == ref.text
    assert_all_blocks_free(tight.get_stats())


def test_prefix_caching_hits_and_same_output(tight, roomy):
    shared = "A long shared system prompt that many requests start with. " * 5
    first = tight.generate(shared + "First question?", GREEDY, use_tqdm=False)[0]
    stats = tight.get_stats()
    second = tight.generate(shared + "Second question!", GREEDY, use_tqdm=False)[0]
    after = tight.get_stats()
    n_shared = len(tight.get_tokenizer().encode(shared))
    assert after["prefix_cache_hit_tokens"] - stats["prefix_cache_hit_tokens"] >= (n_shared // 16 - 1) * 16 > 0
    assert second.num_cached_tokens > 0 and second.num_cached_tokens % 16 == 0
    assert second.num_cached_tokens <= len(second.prompt_token_ids) - 1
    ref2 = roomy.generate(shared + "Second question!", GREEDY, use_tqdm=False)[0]
    assert second.outputs[0].token_ids == ref2.outputs[0].token_ids
    ref1 = roomy.generate(shared + "First question?", GREEDY, use_tqdm=False)[0]
    assert first.outputs[0].token_ids == ref1.outputs[0].token_ids
    # A fully repeated prompt hits every full block but recomputes its last token.
    third = tight.generate(shared + "First question?", GREEDY, use_tqdm=False)[0]
    assert third.num_cached_tokens == (len(third.prompt_token_ids) - 1) // 16 * 16
    assert third.outputs[0].token_ids == ref1.outputs[0].token_ids
    assert_all_blocks_free(tight.get_stats())


def test_n_greater_than_one(tight):
    prompt = "Siblings share this prompt which is long enough to fill a few KV blocks of sixteen tokens. " * 2
    params = SamplingParams(n=4, temperature=1.0, seed=77, max_tokens=10, ignore_eos=True)
    before = tight.get_stats()
    out = tight.generate(prompt, params, use_tqdm=False)[0]
    after = tight.get_stats()
    assert sorted(c.index for c in out.outputs) == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    full_blocks = (len(out.prompt_token_ids) - 1) // 16
    assert full_blocks >= 2
    # Every sibling after the first reuses the first one's prompt blocks.
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] >= 3 * full_blocks * 16
    assert_all_blocks_free(after)
    again = tight.generate(prompt, params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    # With a seed, siblings are reproducible one at a time too: sibling i uses seed + i.
    for c in out.outputs:
        single = tight.generate(prompt, params.clone(n=1, seed=77 + c.index), use_tqdm=False)[0]
        assert single.outputs[0].token_ids == c.token_ids
    assert_all_blocks_free(tight.get_stats())


# -- block accounting -----------------------------------------------------------------------------------------
def test_abort_mid_prefill_frees_blocks(tight):
    engine = tight.llm_engine
    prompt = " ".join(WORDS * 4)
    engine.add_request("mid-prefill", prompt, SamplingParams(temperature=0.0, max_tokens=4))
    engine.step()
    req = engine.core.scheduler.requests["mid-prefill"]
    assert 0 < req.num_computed_tokens < req.num_prompt_tokens  # still prefilling
    assert tight.get_stats()["kv_blocks_free"] < tight.get_stats()["kv_blocks_total"]
    finals = engine.abort_request("mid-prefill")
    assert len(finals) == 1 and finals[0].finished and finals[0].outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()
    assert_all_blocks_free(tight.get_stats())


def test_abort_mid_decode_and_waiting_and_preempted(tight):
    engine = tight.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i, p in enumerate(PROMPTS[:16]):
        engine.add_request(f"d{i}", p, params)
    preempted_seen = False
    for _ in range(200):
        engine.step()
        sched = engine.core.scheduler
        preempted_seen |= any(r.num_preemptions for r in sched.requests.values())
        decoding = [r for r in sched.running if r.num_output_tokens >= 2]
        if decoding and preempted_seen and sched.waiting:
            break
    sched = engine.core.scheduler
    assert decoding and sched.waiting
    victims = {decoding[0].request_id, sched.waiting[-1].request_id}
    victims |= {r.request_id for r in sched.requests.values() if r.num_preemptions}
    for rid in victims:
        final = engine.abort_request(rid)[0]
        assert final.outputs[0].finish_reason == "abort"
    assert engine.abort_request("no-such-request") == []
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == {f"d{i}" for i in range(16)} - victims
    assert all(o.outputs[0].finish_reason == "length" for o in finished.values())
    assert_all_blocks_free(tight.get_stats())


def test_abort_of_n_request_frees_all_siblings(tight):
    engine = tight.llm_engine
    engine.add_request("n-abort", PROMPTS[5], SamplingParams(n=3, temperature=1.0, max_tokens=30))
    for _ in range(4):
        engine.step()
    final = engine.abort_request("n-abort")[0]
    assert len(final.outputs) == 3 and all(c.finish_reason == "abort" for c in final.outputs)
    assert not engine.has_unfinished_requests()
    assert_all_blocks_free(tight.get_stats())


def test_async_abort_by_closing_the_generator(tight, alone_outputs):
    engine = AsyncLLM(tight.engine_args, engine=tight.llm_engine)
    try:
        async def run() -> None:
            gen = engine.generate(PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True),
                                  request_id="closed-early")
            first = await gen.__anext__()
            assert not first.finished
            await gen.aclose()
            # A second request on the same engine still runs to completion with the right tokens.
            last = None
            async for out in engine.generate(PROMPTS[4], GREEDY, request_id="after-close"):
                last = out
            assert last.finished and last.outputs[0].token_ids == alone_outputs[4]

        asyncio.run(run())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = engine.get_stats()
            if stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_running"] == 0:
                break
            time.sleep(0.02)
        assert_all_blocks_free(engine.get_stats())
        assert engine.num_unfinished == 0
    finally:
        engine.shutdown()
    assert_all_blocks_free(tight.get_stats())


def test_all_decode_fast_path_prepares_what_the_general_path_does(tight):
    """Every all-decode step of a run under preemption and chunked prefill: the list-based fast path builds the
    same tensors as the general per-request path (which every step with a prefill chunk still takes)."""
    import torch

    runner = tight.llm_engine.core.runner
    seen = []
    general, decodes = runner._prepare_general, runner._prepare_decodes

    def checked(sched):
        fast = decodes(sched)
        ref = general(sched)
        for name in ("input_ids", "positions", "logits_indices"):
            assert torch.equal(getattr(fast, name), getattr(ref, name)), name
        fm, rm = fast.metadata, ref.metadata
        for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
            assert torch.equal(getattr(fm, name), getattr(rm, name)), name
            assert getattr(fm, name).dtype == getattr(rm, name).dtype, name
        for name in ("num_tokens", "num_seqs", "max_query_len", "max_seq_len", "block_size", "query_lens_cpu",
                     "seq_lens_cpu"):
            assert getattr(fm, name) == getattr(rm, name), name
        assert fast.sampling_requests == ref.sampling_requests and not ref.prompt_logprob_chunks
        seen.append(len(sched.scheduled))
        return fast

    runner._prepare_decodes = checked
    try:
        outs = tight.generate(PROMPTS[:12], GREEDY, use_tqdm=False)
    finally:
        del runner._prepare_decodes
    # a failed check inside a step would fail its requests (the engine isolates step errors), not raise here
    assert [o.outputs[0].finish_reason for o in outs] == ["length"] * 12
    assert seen and max(seen) > 1


def test_long_prefill_token_threshold_caps_every_prompt_chunk(tiny_llama_dir, alone_outputs):
    """vLLM's ``long_prefill_token_threshold``: no request computes more than that many tokens in one step, first
    prefills and recomputes after preemption alike, so the decodes sharing a step never wait on a long chunk;
    outputs stay those of each request alone."""
    cap = 8
    llm = LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, long_prefill_token_threshold=cap,
              kv_cache_memory=24 * bytes_per_block(tiny_llama_dir))
    sched = llm.llm_engine.core.scheduler
    chunks: list[tuple[int, int]] = []  # (tokens of the largest chunk, decodes) per step
    real = sched.schedule

    def spy():  # type: ignore[no-untyped-def]
        out = real()
        if out:
            chunks.append((max(s.num_new_tokens for s in out.scheduled),
                           sum(1 for s in out.scheduled if s.num_new_tokens == 1)))
        return out

    sched.schedule = spy
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.get_stats()["num_preemptions"] > 0, "the test must force recompute after preemption"
    assert max(c for c, _ in chunks) == cap, "some prompt must be long enough to be capped"
    assert any(c == cap and d > 0 for c, d in chunks), "a capped chunk must share a step with decodes"
    for i, (out, alone) in enumerate(zip(outs, alone_outputs)):
        assert out.outputs[0].token_ids == alone, f"request {i} differs with capped prefill chunks"
    assert_all_blocks_free(llm.get_stats())


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_long_prefill_token_threshold_is_validated(tiny_llama_dir, bad):
    from llmctl import EngineArgs

    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        EngineArgs(str(tiny_llama_dir), long_prefill_token_threshold=bad)
