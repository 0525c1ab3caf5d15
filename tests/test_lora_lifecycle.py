"""Where multi-LoRA serving tends to break, beyond the happy path: the failures seen on a peer engine (a base-model
request batched with several adapters getting an adapter's output; a bad adapter killing the engine), an adapter
unloaded or replaced while its requests still run, and the prefix cache keeping adapters apart. Outputs are held to
transformers with the adapter merged (fp32, greedy)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from llmctl import LLM, AsyncLLM, EngineArgs, SamplingParams
from llmctl.lora import LoRARequest

from tests.lora_support import make_adapter, merged_generate

pytest.importorskip("peft")

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lifecycle")
    base = tiny_model_dirs["llama"]
    return {"a": make_adapter(base, root / "a", 8, 16, ["q_proj", "v_proj", "down_proj"], False, seed=21),
            "b": make_adapter(base, root / "b", 4, 8, ["k_proj", "o_proj", "gate_proj", "up_proj"], True, seed=22),
            "big": make_adapter(base, root / "big", 32, 32, ["q_proj"], False, seed=23)}


@pytest.fixture(scope="module")
def wants(tiny_model_dirs, adapters) -> dict[str | None, list[int]]:
    base = tiny_model_dirs["llama"]
    return {name: merged_generate(base, None if name is None else adapters[name], [PROMPT])[0]
            for name in (None, "a", "b")}


def _llm(tiny_model_dirs, **kw) -> LLM:
    kw.setdefault("max_loras", 2)
    return LLM(str(tiny_model_dirs["llama"]), dtype="float32", enable_lora=True, max_lora_rank=16,
               kv_cache_memory=16 << 20, **kw)


def _record_steps(llm: LLM) -> list[list[int]]:
    """Each step's slot per scheduled request (-1: the base model), as the LoRA manager mapped them; a step the
    manager could not map is recorded as its exception (the engine would retry its requests one at a time)."""
    manager = llm.llm_engine.core.lora
    steps: list = []
    begin = manager.begin_step

    def recording(adapters, num_tokens, device):
        try:
            begin(adapters, num_tokens, device)
        except Exception as exc:
            steps.append(exc)
            raise
        steps.append([manager.slot_of(a) for a in adapters])

    manager.begin_step = recording
    return steps


# -- peer failure 1: a base-model request batched with two different adapters -----------------------------------
def test_a_base_request_in_one_step_with_two_adapters_gets_the_base_models_output(tiny_model_dirs, adapters, wants):
    """The same prompt under the base model and two adapters, the base request first, between and last in the
    batch: every step maps all three together (two slots and the base rows), and each gets its own model's
    tokens."""
    llm = _llm(tiny_model_dirs)
    steps = _record_steps(llm)
    loras = {"a": LoRARequest("a", 1, str(adapters["a"])), "b": LoRARequest("b", 2, str(adapters["b"]))}
    for order in ((None, "a", "b"), ("a", None, "b"), ("a", "b", None)):
        steps.clear()
        outs = llm.generate([{"prompt_token_ids": PROMPT}] * 3, GREEDY, use_tqdm=False,
                            lora_request=[None if n is None else loras[n] for n in order])
        for name, out in zip(order, outs, strict=True):
            assert out.outputs[0].token_ids == wants[name], (order, name)
        assert steps and all(len(s) == 3 and s.count(-1) == 1 and len(set(s)) == 3 for s in steps), steps
    assert len({tuple(w) for w in wants.values()}) == 3  # the three models really differ on this prompt


# -- peer failure 2: a bad adapter offline must not take the engine down ------------------------------------------
def test_a_bad_adapter_in_an_offline_batch_fails_the_call_with_the_reason_and_the_engine_keeps_serving(
        tiny_model_dirs, adapters, wants, tmp_path):
    llm = _llm(tiny_model_dirs)
    good = LoRARequest("a", 1, str(adapters["a"]))
    free = llm.get_stats()["kv_blocks_free"]
    for bad, why in ((LoRARequest("big", 7, str(adapters["big"])), "r: rank 32 is above max_lora_rank 16"),
                     (LoRARequest("gone", 8, str(tmp_path / "gone")), "lora_path: no such adapter directory")):
        with pytest.raises(ValueError, match=why) as err:
            llm.generate([{"prompt_token_ids": PROMPT}] * 3, GREEDY, use_tqdm=False, lora_request=[good, bad, None])
        assert repr(bad.lora_name) in str(err.value)
        assert llm.get_stats()["kv_blocks_free"] == free  # the good requests added before it were withdrawn
        assert not llm.llm_engine.has_unfinished_requests()
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * 2, GREEDY, use_tqdm=False, lora_request=[good, None])
    assert [o.outputs[0].token_ids for o in outs] == [wants["a"], wants[None]]


def test_a_bad_adapter_fails_only_its_own_request_among_running_ones(tiny_model_dirs, adapters, wants, tmp_path):
    """The async engine (what the server drives): requests already in flight under an adapter and under the base
    model finish with their own tokens while requests with a bad adapter fail with the reason."""
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(tiny_model_dirs["llama"]), dtype="float32",
                                                  enable_lora=True, max_loras=2, max_lora_rank=16,
                                                  kv_cache_memory=16 << 20))
    good = LoRARequest("a", 1, str(adapters["a"]))
    bad = {"big": LoRARequest("big", 7, str(adapters["big"])), "gone": LoRARequest("gone", 8, str(tmp_path / "x"))}

    async def final(rid: str, lora: LoRARequest | None):
        last = None
        async for out in engine.generate({"prompt_token_ids": PROMPT}, GREEDY, request_id=rid, lora_request=lora):
            last = out
        return last.outputs[0].token_ids

    async def run():
        running = [asyncio.create_task(final(f"ok-{i}", lora)) for i, lora in enumerate((good, None, good))]
        await asyncio.sleep(0)
        results = await asyncio.gather(*(final(name, req) for name, req in bad.items()), *running,
                                       return_exceptions=True)
        return results, await final("after", good)

    try:
        results, after = asyncio.run(run())
        for err, (name, why) in zip(results[:2], (("big", "rank 32 is above max_lora_rank 16"),
                                                  ("gone", "no such adapter directory")), strict=True):
            assert isinstance(err, ValueError) and why in str(err) and repr(name) in str(err), err
        assert results[2:] == [wants["a"], wants[None], wants["a"]]
        assert after == wants["a"]
        engine.check_health()
    finally:
        engine.shutdown()


# -- an adapter in use stays resident until its requests finish ---------------------------------------------------
def _run_to_end(engine, outs: dict[str, list[int]]) -> None:
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids


def test_an_adapter_removed_while_its_request_runs_serves_that_request_to_the_end(tiny_model_dirs, adapters,
                                                                                  wants):
    llm = _llm(tiny_model_dirs, max_loras=1)
    engine = llm.llm_engine
    req = LoRARequest("a", 1, str(adapters["a"]))
    engine.add_request("r1", {"prompt_token_ids": PROMPT}, GREEDY, lora_request=req)
    engine.step()
    engine.step()
    assert engine.remove_lora(1) and 1 not in engine.list_loras()
    engine.add_request("base", {"prompt_token_ids": PROMPT}, GREEDY)
    outs: dict[str, list[int]] = {}
    _run_to_end(engine, outs)
    assert outs == {"r1": wants["a"], "base": wants[None]}
    with pytest.raises(ValueError, match="no such adapter directory"):  # removed means read again from its path
        engine.add_request("r2", {"prompt_token_ids": PROMPT}, GREEDY,
                           lora_request=LoRARequest("a", 1, str(adapters["a"]) + "-moved"))


@pytest.mark.parametrize("how", ["removed and loaded again", "same id, another path"])
def test_an_adapter_replaced_under_its_id_while_in_use_keeps_both_apart(tiny_model_dirs, adapters, wants, how):
    """With one device slot, the running request keeps its adapter and the new one under the same id waits for
    the slot (two adapters that share an id are still two adapters), instead of the engine failing to find a
    slot."""
    llm = _llm(tiny_model_dirs, max_loras=1)
    steps = _record_steps(llm)
    engine = llm.llm_engine
    engine.add_request("old", {"prompt_token_ids": PROMPT}, GREEDY, lora_request=LoRARequest("a", 1,
                                                                                            str(adapters["a"])))
    engine.step()
    if how == "removed and loaded again":
        engine.remove_lora(1)
        new, want = LoRARequest("a", 1, str(adapters["a"])), wants["a"]
    else:
        new, want = LoRARequest("a", 1, str(adapters["b"])), wants["b"]
    engine.add_request("new", {"prompt_token_ids": PROMPT}, GREEDY, lora_request=new)
    outs: dict[str, list[int]] = {}
    _run_to_end(engine, outs)
    assert outs == {"old": wants["a"], "new": want}
    assert all(s == [0] for s in steps), steps  # one adapter per step, every step mapped (none retried)


# -- prefix cache: the adapter is part of every block's hash ------------------------------------------------------
def test_the_prefix_cache_never_shares_blocks_between_adapters(tiny_model_dirs, adapters, wants):
    block = 16
    llm = _llm(tiny_model_dirs, enable_prefix_caching=True, block_size=block)
    loras = {None: None, "a": LoRARequest("a", 1, str(adapters["a"])), "b": LoRARequest("b", 2, str(adapters["b"]))}
    assert block < len(PROMPT) < 2 * block  # one full block to share or not
    seen = {}
    for name in ("a", None, "b", "a", "b", None):
        out = llm.generate([{"prompt_token_ids": PROMPT}], GREEDY, use_tqdm=False, lora_request=loras[name])[0]
        assert out.outputs[0].token_ids == wants[name], name
        seen.setdefault(name, []).append(out.num_cached_tokens)
    assert seen == {name: [0, block] for name in (None, "a", "b")}, seen  # a hit only under the same adapter
