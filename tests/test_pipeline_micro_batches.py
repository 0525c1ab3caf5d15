"""Pipeline micro-batches in flight (``llmctl.engine.batch_queue``): two stages as ``mp`` worker processes keep two
batches outstanding, each with half the running requests, and give the greedy tokens of one process; aborts and
preemption while batches are in flight leak no KV block; a dead stage ends the engine."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests._engine_util import assert_all_blocks_free, one_torch_thread
from tests.model_factory import make_tiny_model
from tests.test_scheduler_policy import make_scheduler, request
from tests.test_scheduler_policy import step as scheduler_step
from tests.test_tensor_parallel_mp import _assert_dies_cleanly

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
PROMPTS = [f"Request {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + (i * 5) % 37))
           for i in range(16)]


def test_scheduler_never_reschedules_nor_preempts_a_request_in_flight():
    """The scheduler alone: four decoding requests, one block free, the newest in flight. The second request's
    new block comes from the newest request *not* in flight; the one in flight is neither scheduled nor touched."""
    s = make_scheduler(budget=512, blocks=5)
    for i in range(4):
        s.add(request(f"r{i}", prompt_len=16))
    scheduler_step(s)  # four prompts of one block each; their next token needs a second block each
    r3 = s.requests["r3"]
    s.in_flight.add("r3")
    out = s.schedule()
    assert [i.request.request_id for i in out.scheduled] == ["r0", "r1"]
    assert [r.request_id for r in out.preempted] == ["r2"]
    assert r3.status.name == "RUNNING" and len(r3.block_ids) == 1
    s.in_flight.clear()
    capped = make_scheduler(budget=512)
    for i in range(4):
        capped.add(request(f"c{i}", prompt_len=16))
    assert [i.request.request_id for i in capped.schedule(max_seqs=2).scheduled] == ["c0", "c1"]


def _params():
    from llmctl import SamplingParams

    return [SamplingParams(temperature=0.0, max_tokens=4 + (i * 5) % 13, logprobs=1, ignore_eos=True)
            for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def model(tmp_path_factory, test_tokenizer):
    return make_tiny_model("llama", tmp_path_factory.mktemp("pp-micro") / "llama", test_tokenizer)


def _stage_block_bytes(model_dir) -> int:
    """One KV block of one stage (one of the model's two layers), float32."""
    cfg = json.loads((model_dir / "config.json").read_text())
    head = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * (cfg["num_hidden_layers"] // 2) * 16 * cfg["num_key_value_heads"] * head * 4


@pytest.fixture(scope="module")
def pp1(model):
    from llmctl import LLM

    with one_torch_thread():
        llm = LLM(str(model), dtype="float32", num_threads=1, seed=0, enable_prefix_caching=False)
        yield {p: o.outputs[0] for p, o in zip(PROMPTS, llm.generate(PROMPTS, _params(), use_tqdm=False),
                                                strict=True)}
        llm.llm_engine.shutdown()


@pytest.fixture(scope="module")
def pp2(model):
    """Two stages with a tight KV cache (24 blocks) and a 32-token budget: chunked prefill and preemption."""
    from llmctl import LLM

    llm = LLM(str(model), dtype="float32", pipeline_parallel_size=2, num_threads=1, seed=0,
              kv_cache_memory=24 * _stage_block_bytes(model), max_num_batched_tokens=32, enable_prefix_caching=False)
    yield llm
    llm.llm_engine.shutdown()


def _assert_same(got, want) -> None:
    import torch

    assert list(got.token_ids) == list(want.token_ids)
    lp = [[d[t].logprob for d, t in zip(c.logprobs, c.token_ids, strict=True)] for c in (got, want)]
    torch.testing.assert_close(torch.tensor(lp[0]), torch.tensor(lp[1]), atol=1e-4, rtol=1e-4)


def test_pp2_micro_batches_match_pp1_under_preemption(pp2, pp1):
    outs = pp2.generate(PROMPTS, _params(), use_tqdm=False)
    stats = pp2.get_stats()
    assert stats["pipeline_max_in_flight"] == 2, stats
    assert stats["num_preemptions"] > 0, "the test must force preemption"
    for p, out in zip(PROMPTS, outs, strict=True):
        _assert_same(out.outputs[0], pp1[p])
    assert_all_blocks_free(stats)


def test_aborts_while_batches_are_in_flight_leak_no_blocks(pp2, pp1):
    engine = pp2.llm_engine
    params = _params()
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"a{i}", p, params[i])
    done = {}
    for step in range(40):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if step in (3, 6, 9):  # some of these are in a batch that has not come back
            engine.abort_request([f"a{i}" for i in range(step // 3 - 1, len(PROMPTS), 4)])
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    aborted = {f"a{i}" for s in (3, 6, 9) for i in range(s // 3 - 1, len(PROMPTS), 4)}
    for i, p in enumerate(PROMPTS):
        if f"a{i}" not in aborted:
            _assert_same(done[f"a{i}"].outputs[0], pp1[p])
    assert_all_blocks_free(pp2.get_stats())


def test_killed_stage_ends_the_engine(pp2):
    """Runs last: it kills the module's engine."""
    _assert_dies_cleanly(pp2, lambda pids: os.kill(pids[1], signal.SIGKILL))
