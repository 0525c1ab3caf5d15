"""How prompt chunks and decodes share a step: the scheduler alone (no model), stepped with a stand-in for the
model's output, so each test sees exactly which requests each step carries."""

from __future__ import annotations

import time

import pytest
from llmctl import EngineArgs, SamplingParams
from llmctl.config import SchedulerConfig
from llmctl.engine.request import Request
from llmctl.engine.scheduler import Scheduler, SchedulerOutput
from llmctl.engine.step_output import ModelStepOutput
from llmctl.kv.manager import KVCacheManager


def make_scheduler(budget: int, partial: int = 0, max_len: int = 512, blocks: int = 2048, gap: int = 0) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=budget, max_model_len=max_len,
                          max_num_partial_prefills=partial, min_decode_steps_between_prefills=gap)
    return Scheduler(cfg, KVCacheManager(blocks, 16, enable_prefix_caching=False))


def request(rid: str, prompt_len: int = 128, max_tokens: int = 128) -> Request:
    prompt = [100 + (hash(rid) + j) % 30000 for j in range(prompt_len)]
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return Request(rid, prompt, sp, time.time(), max_tokens=max_tokens, all_token_ids=list(prompt))


def step(s: Scheduler) -> SchedulerOutput:
    """One step: schedule, then apply a sampled token to every request whose chunk reached its end."""
    out = s.schedule()
    sampling = [item.request for item in out.scheduled if item.samples]
    s.update_from_output(out, ModelStepOutput(sampling, [[1] for _ in sampling], [None] * len(sampling)))
    return out


def prompt_chunks(out: SchedulerOutput) -> dict[str, int]:
    return {i.request.request_id: i.num_new_tokens for i in out.scheduled if i.num_new_tokens > 1}


def decodes(out: SchedulerOutput) -> set[str]:
    return {i.request.request_id for i in out.scheduled if i.num_new_tokens == 1}


def sixteen_decoding(s: Scheduler) -> set[str]:
    for i in range(16):
        s.add(request(f"d{i}"))
    while len(s.running) < 16 or any(r.num_computed_tokens < 128 for r in s.running):
        step(s)
    return {r.request_id for r in s.running}


@pytest.mark.parametrize("partial", [0, 1])
def test_a_waiting_prompt_gets_a_chunk_in_the_very_next_step_beside_sixteen_decodes(partial):
    s = make_scheduler(budget=256, partial=partial)
    running = sixteen_decoding(s)
    s.add(request("new"))
    out = step(s)
    assert decodes(out) == running  # every decode still runs
    assert prompt_chunks(out) == {"new": 128}  # and the whole prompt fits beside them: 16 + 128 <= 256
    assert s.requests["new"].num_output_tokens == 1  # its first token comes from that step


def test_a_prompt_larger_than_what_the_decodes_leave_is_chunked_not_delayed():
    s = make_scheduler(budget=64)
    running = sixteen_decoding(s)
    s.add(request("new", prompt_len=100))
    chunks = []
    while s.requests["new"].num_output_tokens == 0:
        out = step(s)
        assert decodes(out) >= running - {rid for rid in running if rid not in s.requests}
        chunks.append(prompt_chunks(out)["new"])
    assert chunks == [48, 48, 4]  # 64 - 16 decodes per step, from the first step on


def test_one_partial_prefill_takes_prompts_that_arrive_together_one_per_step():
    s = make_scheduler(budget=1024, partial=1)
    for i in range(4):
        s.add(request(f"r{i}"))
    seen = []
    for _ in range(4):
        out = step(s)
        seen.append(prompt_chunks(out))
    assert seen == [{"r0": 128}, {"r1": 128}, {"r2": 128}, {"r3": 128}]
    out = step(s)
    assert prompt_chunks(out) == {} and decodes(out) == {"r0", "r1", "r2", "r3"}


def test_without_a_cap_prompts_that_arrive_together_share_a_step():
    s = make_scheduler(budget=1024, partial=0)
    for i in range(4):
        s.add(request(f"r{i}"))
    assert prompt_chunks(step(s)) == {f"r{i}": 128 for i in range(4)}


def test_a_running_partial_prefill_holds_the_slot_and_decodes_keep_running():
    s = make_scheduler(budget=64, partial=1)
    s.add(request("a", prompt_len=16, max_tokens=50))
    step(s)  # a: whole prompt, first token
    s.add(request("long", prompt_len=150))
    s.add(request("next", prompt_len=8))
    out = step(s)
    assert decodes(out) == {"a"} and prompt_chunks(out) == {"long": 63}
    out = step(s)  # long is still in its prompt: next waits although the budget has room
    assert decodes(out) == {"a"} and prompt_chunks(out) == {"long": 63}
    out = step(s)
    assert prompt_chunks(out) == {"long": 24} and "next" not in {i.request.request_id for i in out.scheduled}
    out = step(s)
    assert prompt_chunks(out) == {"next": 8} and decodes(out) == {"a", "long"}


def test_a_cached_prompt_with_one_token_left_is_not_held_back_by_the_cap():
    s = make_scheduler(budget=1024, partial=1)
    s.kv = KVCacheManager(2048, 16, enable_prefix_caching=True)
    first = request("first", prompt_len=65, max_tokens=1)
    s.add(first)
    step(s)  # computes and caches its 4 full blocks, then finishes
    assert "first" not in s.requests
    again = request("again", prompt_len=0, max_tokens=4)
    again.prompt_token_ids = list(first.prompt_token_ids)
    again.all_token_ids = list(first.prompt_token_ids)
    s.add(request("long"))
    s.add(again)
    out = step(s)
    assert prompt_chunks(out) == {"long": 128}
    assert {i.request.request_id: i.num_new_tokens for i in out.scheduled} == {"long": 128, "again": 1}


def test_one_prompt_per_step_staggers_streams_that_start_together():
    """Sixteen equal requests started at once: with the cap their finishing steps (when a closed-loop client
    sends the next request) are spread over sixteen steps; with whole waves in one step they all end together."""

    def finish_steps(partial: int) -> list[int]:
        s = make_scheduler(budget=4096, partial=partial)
        for i in range(16):
            s.add(request(f"r{i}", max_tokens=32))
        ends, n = {}, 0
        while s.has_unfinished():
            n += 1
            step(s)
            for rid in [f"r{i}" for i in range(16)]:
                if rid not in s.requests and rid not in ends:
                    ends[rid] = n
        return sorted(ends.values())

    assert len(set(finish_steps(1))) == 16
    assert len(set(finish_steps(0))) == 1


def test_a_decode_step_follows_each_prompt_step_while_requests_decode():
    s = make_scheduler(budget=1024, partial=1, gap=1)
    running = sixteen_decoding(s)
    step(s)  # the step after the last of their prompts: decodes alone
    s.add(request("a"))
    s.add(request("b"))
    seen = [(prompt_chunks(out), decodes(out) >= running) for out in (step(s) for _ in range(4))]
    assert seen == [({"a": 128}, True), ({}, True), ({"b": 128}, True), ({}, True)]


def test_the_decode_step_gap_never_leaves_a_step_empty():
    s = make_scheduler(budget=1024, partial=1, gap=1)
    for i in range(3):
        s.add(request(f"r{i}", max_tokens=1))  # nothing left to decode after its prompt step
    assert [prompt_chunks(step(s)) for _ in range(3)] == [{"r0": 128}, {"r1": 128}, {"r2": 128}]


def closed_loop_ttft(gap: int) -> list[float]:
    """16 closed-loop streams on a step-cost clock (a decode-only step costs 1, a step with a 128-token prompt 8,
    about this CPU's ratio for W): a stream's next request arrives after the step that ends its previous one and
    reaches the engine one step later, as a served one does. TTFT in decode-step units, from arrival."""
    s = make_scheduler(budget=1024, partial=1, gap=gap)
    now, arrived, ttft, sent_now, in_transit = 0.0, {}, [], [], []
    for i in range(16):
        s.add(request(f"r{i}", prompt_len=128, max_tokens=48))
        arrived[f"r{i}"] = 0.0
    sent = 16
    while s.has_unfinished() or sent_now or in_transit:
        for req in in_transit:  # sent when the step before last ended: reached the engine during the last one
            s.add(req)
        in_transit, sent_now = sent_now, []
        out = step(s)
        now += 8 if prompt_chunks(out) else 1
        for item in out.scheduled:
            req = item.request
            if req.num_output_tokens == 1 and item.num_new_tokens > 1:  # its prompt step gave its first token
                ttft.append(now - arrived[req.request_id])
            if req.finished and sent < 40:
                rid, sent = f"r{sent}", sent + 1
                sent_now.append(request(rid, prompt_len=128, max_tokens=48))
                arrived[rid] = now
    return sorted(ttft[16:])  # the streams' later requests (the first wave all arrive at once)


def test_with_the_decode_step_gap_a_served_prompt_no_longer_waits_for_another_prompt():
    before, after = closed_loop_ttft(gap=0), closed_loop_ttft(gap=1)
    assert len(before) == len(after) == 24
    assert before[12] >= 16  # median: the prompt step in flight when it arrived, then its own
    assert after[12] <= 10  # median: a decode step, then its own prompt step


def test_max_num_partial_prefills_is_validated():
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_num_partial_prefills"):
            EngineArgs(model="m", max_num_partial_prefills=bad)
    with pytest.raises(ValueError, match="usage_context"):
        EngineArgs(model="m", usage_context="batch")
    assert EngineArgs(model="m", max_num_partial_prefills=0).max_num_partial_prefills == 0
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="min_decode_steps_between_prefills"):
            EngineArgs(model="m", min_decode_steps_between_prefills=bad)


def test_cpu_platform_takes_one_prompt_per_step_only_online():
    from llmctl_cpu.platform import CpuPlatform

    p = CpuPlatform()
    for ctx, want in (("openai_api_server", 1), ("engine_context", 1), ("llm_class", None), (None, None)):
        changes = p.configure(EngineArgs(model="m", usage_context=ctx))
        assert changes.get("max_num_partial_prefills") == want, ctx
        # the decode-only step between prompt steps is opt-in for now (llmctl_cpu.platform says why)
        assert changes.get("min_decode_steps_between_prefills") == (None if want is None else 0), ctx
    # a value the user set is never replaced
    explicit = p.configure(EngineArgs(model="m", usage_context="openai_api_server", max_num_partial_prefills=0,
                                      min_decode_steps_between_prefills=0))
    assert "max_num_partial_prefills" not in explicit and "min_decode_steps_between_prefills" not in explicit
