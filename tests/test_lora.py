"""Multi-LoRA: PEFT adapters made with peft on a tiny model, served per request in mixed batches, compared
with transformers running the same adapter merged into the base weights (fp32, greedy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llmctl import LLM, SamplingParams
from llmctl.lora import LoRARequest

from tests.lora_support import MAX_TOKENS, make_adapter, merged_generate

pytest.importorskip("peft")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [31, 32, 33], [40, 41, 42, 43, 44]]
# name -> (rank, alpha, targets, rslora)
ADAPTERS = {
    "attn": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    "mlp": (4, 8, ["gate_proj", "up_proj", "down_proj"], True),
    "all": (16, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
            False),
}


@pytest.fixture(scope="module")
def adapters(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {name: make_adapter(tiny_model_dirs["llama"], root / name, *spec, seed=i)
            for i, (name, spec) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def lora_llm(tiny_model_dirs) -> LLM:
    # max_loras=2 with three adapters in one batch: the scheduler splits steps and slots are evicted and reloaded
    return LLM(str(tiny_model_dirs["llama"]), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16,
               max_cpu_loras=2, kv_cache_memory=32 << 20)


def _requests(adapters: dict[str, Path]) -> dict[str, LoRARequest]:
    return {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}


def test_mixed_batch_of_three_adapters_and_the_base_model_equals_merged_transformers(tiny_model_dirs, adapters,
                                                                                      lora_llm):
    """One generate call, every prompt under every adapter and under none, all in flight together: each output
    is what transformers gives with that adapter merged (the same prompt under four models also checks that the
    prefix cache keeps adapters apart)."""
    base = tiny_model_dirs["llama"]
    loras = _requests(adapters)
    jobs = [(p, name) for p in PROMPTS for name in (*loras, None)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = lora_llm.generate([{"prompt_token_ids": p} for p, _ in jobs], params, use_tqdm=False,
                             lora_request=[None if n is None else loras[n] for _, n in jobs])
    got = {(tuple(p), n): o.outputs[0].token_ids for (p, n), o in zip(jobs, outs)}
    for name in (*loras, None):
        wants = merged_generate(base, None if name is None else adapters[name], PROMPTS)
        for p, want in zip(PROMPTS, wants):
            assert got[(tuple(p), name)] == want, (name, p)
    assert len({tuple(got[(tuple(PROMPTS[0]), n)]) for n in (*loras, None)}) == 4  # every adapter changes output
    # Again, after every adapter has been evicted from a slot (and the host cache) at least once: same tokens.
    again = lora_llm.generate([{"prompt_token_ids": p} for p, _ in jobs], params, use_tqdm=False,
                              lora_request=[None if n is None else loras[n] for _, n in jobs])
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
    stats = lora_llm.get_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] or stats.get("prefix_cached_blocks") is not None


def _bad_adapter(tmp_path: Path, good: Path, name: str, **config_changes) -> Path:
    bad = tmp_path / name
    bad.mkdir()
    config = json.loads((good / "adapter_config.json").read_text())
    config.update(config_changes)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    (bad / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    return bad


def test_bad_adapters_fail_their_own_request_with_the_reason_and_the_engine_keeps_serving(
        tmp_path, tiny_model_dirs, adapters, lora_llm):
    from safetensors.torch import load_file, save_file

    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompt = {"prompt_token_ids": PROMPTS[1]}
    cases = []
    cases.append((LoRARequest("missing", 90, str(tmp_path / "nope")), "lora_path: no such adapter directory"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    cases.append((LoRARequest("noweights", 91, str(empty)), "no adapter weights"))
    big = make_adapter(tiny_model_dirs["llama"], tmp_path / "big", 32, 32, ["q_proj"], False, seed=7)
    cases.append((LoRARequest("big", 92, str(big)), "rank 32 is above max_lora_rank 16"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text((adapters["attn"] / "adapter_config.json").read_text())
    tensors = load_file(str(adapters["attn"] / "adapter_model.safetensors"))
    renamed = {k.replace("q_proj", "x_proj"): v for k, v in tensors.items()}
    save_file(renamed, str(foreign / "adapter_model.safetensors"))
    cases.append((LoRARequest("foreign", 93, str(foreign)), "target_modules: the model has no module "
                   "model.layers.0.self_attn.x_proj"))
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "adapter_config.json").write_text((adapters["attn"] / "adapter_config.json").read_text())
    save_file({k: (torch.zeros(v.shape[0], 2 * v.shape[1]) if "lora_A" in k else v) for k, v in tensors.items()},
              str(wide / "adapter_model.safetensors"))
    cases.append((LoRARequest("wide", 94, str(wide)), "base model mismatch"))
    cases.append((LoRARequest("dora", 95, str(_bad_adapter(tmp_path, adapters["attn"], "dora", use_dora=True))),
                  "use_dora: DoRA adapters are not supported"))
    free_before = lora_llm.get_stats()["kv_blocks_free"]
    for req, why in cases:
        with pytest.raises(ValueError, match=why) as err:
            lora_llm.generate([prompt], params, use_tqdm=False, lora_request=req)
        assert req.lora_name in str(err.value)
    assert lora_llm.get_stats()["kv_blocks_free"] == free_before
    ok = lora_llm.generate([prompt], params, use_tqdm=False, lora_request=_requests(adapters)["attn"])
    assert len(ok[0].outputs[0].token_ids) == 4


def test_lora_settings_are_checked_before_loading(tiny_model_dirs):
    with pytest.raises(ValueError, match=r"max_lora_rank: must be an integer in \[1, 64\], got 128"):
        LLM(str(tiny_model_dirs["llama"]), enable_lora=True, max_lora_rank=128)
    with pytest.raises(ValueError, match="max_cpu_loras: must be an integer >= max_loras"):
        LLM(str(tiny_model_dirs["llama"]), enable_lora=True, max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValueError, match="lora_request.lora_int_id: must be an integer >= 1"):
        LoRARequest("a", 0, "x")


def test_a_lora_request_needs_enable_lora(tiny_model_dirs, adapters):
    llm = LLM(str(tiny_model_dirs["llama"]), dtype="float32", kv_cache_memory=16 << 20)
    with pytest.raises(ValueError, match="started without enable_lora"):
        llm.generate([PROMPTS[1]], SamplingParams(max_tokens=2), use_tqdm=False,
                     lora_request=LoRARequest("attn", 1, str(adapters["attn"])))


def test_lora_shrink_expand_reference_matches_per_row_math():
    from llmctl.ops.reference import lora_shrink_expand

    torch.manual_seed(0)
    x, y = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 20, dtype=torch.float64)
    a, b = torch.randn(3, 4, 12, dtype=torch.float64), torch.randn(3, 4, 9, dtype=torch.float64)
    slots = torch.tensor([0, -1, 2, 2, 0, -1, 2])
    want = y.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want[t, 5:14] += b[s].t() @ (a[s] @ x[t])
    lora_shrink_expand(x, y[:, 5:14], a, b, slots, (0, 2))
    assert torch.allclose(y, want)
