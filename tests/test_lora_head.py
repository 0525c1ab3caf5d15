"""LoRA on the LM head: adapters whose target_modules include ``lm_head`` (alone or with other projections),
mixed in one batch with an adapter without a head and with the base model, held to peft in fp32: greedy tokens
equal the merged model's, sampled and prompt logprobs are close to it. On a tied-embedding model the head's
adapter changes the logits only, as in peft's unmerged forward (merging would also change the shared embedding)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llmctl import LLM, SamplingParams
from llmctl.lora import LoRARequest

from tests.lora_support import MAX_TOKENS, make_adapter, merged_generate

pytest.importorskip("peft")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [31, 32, 33], [40, 41, 42, 43, 44]]
# name -> (rank, alpha, targets, rslora)
ADAPTERS = {
    "head": (8, 16, ["q_proj", "v_proj", "lm_head"], False),
    "headonly": (4, 8, ["lm_head"], True),
    "attn": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
}
TOL = 2e-3


@pytest.fixture(scope="module")
def head_adapters(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("head-loras")
    return {name: make_adapter(tiny_model_dirs["llama"], root / name, *spec, seed=20 + i)
            for i, (name, spec) in enumerate(ADAPTERS.items())}


def _peft_model(base: Path, adapter: Path | None, merge: bool):
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
        if merge:
            model = model.merge_and_unload()
    return model.eval()


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def _check_logprobs(out, ref: torch.Tensor) -> None:
    """Sampled and prompt logprobs of one llmctl output against the reference's log-softmax rows."""
    comp, prompt = out.outputs[0], out.prompt_token_ids
    n = len(prompt)
    for j, (tok, lp) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
        assert abs(lp[tok].logprob - float(ref[n - 1 + j, tok])) < TOL, (j, tok)
    for i in range(1, n):
        tok = prompt[i]
        assert abs(out.prompt_logprobs[i][tok].logprob - float(ref[i - 1, tok])) < TOL, i


def test_lm_head_adapters_mixed_with_others_and_the_base_model_equal_peft(tiny_model_dirs, head_adapters):
    base = tiny_model_dirs["llama"]
    # max_loras=2 for three adapters: head slots are evicted and reloaded between steps too
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory=32 << 20)
    loras = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(head_adapters.items())}
    jobs = [(p, name) for p in PROMPTS for name in (*loras, None)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], params, use_tqdm=False,
                        lora_request=[None if n is None else loras[n] for _, n in jobs])
    got = {(tuple(p), n): o for (p, n), o in zip(jobs, outs, strict=True)}
    for name in (*loras, None):
        adapter = None if name is None else head_adapters[name]
        wants = merged_generate(base, adapter, PROMPTS)
        merged = _peft_model(base, adapter, merge=True)
        for p, want in zip(PROMPTS, wants, strict=True):
            out = got[(tuple(p), name)]
            assert out.outputs[0].token_ids == want, (name, p)
            _check_logprobs(out, _logprobs(merged, p + want))
    # the head-only adapter changes the output: the head's LoRA is really applied
    assert got[(tuple(PROMPTS[0]), "headonly")].outputs[0].token_ids != got[(tuple(PROMPTS[0]), None)].outputs[0] \
        .token_ids


def test_lm_head_adapter_on_a_tied_model_changes_only_the_logits_as_peft_does(tiny_model_dirs, tmp_path):
    base = tiny_model_dirs["llama_tied"]
    path = make_adapter(base, tmp_path / "tied-head", 8, 16, ["lm_head"], False, seed=31)
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_lora_rank=8, kv_cache_memory=16 << 20)
    req = LoRARequest("tied-head", 1, str(path))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]] * 2, params, use_tqdm=False,
                        lora_request=[req, req, None, None])
    peft_model = _peft_model(base, path, merge=False)
    plain = _peft_model(base, None, merge=False)
    for out, model in zip(outs, (peft_model, peft_model, plain, plain), strict=True):
        ids = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
        ref = _logprobs(model, ids)
        n = len(out.prompt_token_ids)
        assert out.outputs[0].token_ids == ref[n - 1:-1].argmax(-1).tolist()  # greedy under the reference
        _check_logprobs(out, ref)
    assert outs[0].outputs[0].token_ids != outs[2].outputs[0].token_ids


def test_bad_lm_head_adapters_name_the_module(tiny_model_dirs, head_adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny_model_dirs["llama"]
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_lora_rank=8, kv_cache_memory=16 << 20)
    good = head_adapters["headonly"]
    config = json.loads((good / "adapter_config.json").read_text())
    tensors = load_file(str(good / "adapter_model.safetensors"))
    cases = []
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    save_file(tensors, str(saved / "adapter_model.safetensors"))
    cases.append(("saved", saved, r"modules_to_save: fully trained modules \(lm_head\) are not supported"))
    resized = tmp_path / "resized"  # trained with 8 added tokens: the head's B has more rows than the vocab
    resized.mkdir()
    (resized / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: torch.cat([v, torch.zeros(8, v.shape[1])]) if "lora_B" in k else v for k, v in tensors.items()},
              str(resized / "adapter_model.safetensors"))
    cases.append(("resized", resized, r"base model mismatch: lm_head expects"))
    norm = tmp_path / "norm"
    norm.mkdir()
    (norm / "adapter_config.json").write_text(json.dumps(config))
    save_file({k.replace("lm_head", "model.norm"): v for k, v in tensors.items() if "base_layer" not in k},
              str(norm / "adapter_model.safetensors"))
    cases.append(("norm", norm, r"target_modules: the model has no module model.norm \(LoRA can target: .*lm_head"))
    for i, (name, path, why) in enumerate(cases):
        with pytest.raises(ValueError, match=why) as err:
            llm.generate([{"prompt_token_ids": PROMPTS[1]}], SamplingParams(max_tokens=2), use_tqdm=False,
                         lora_request=LoRARequest(name, 50 + i, str(path)))
        assert name in str(err.value)
    ok = llm.generate([{"prompt_token_ids": PROMPTS[1]}], SamplingParams(max_tokens=2), use_tqdm=False,
                      lora_request=LoRARequest("headonly", 1, str(good)))
    assert len(ok[0].outputs[0].token_ids) == 2


def test_eagle_drafting_is_refused_with_lora_by_name(tiny_model_dirs):
    with pytest.raises(ValueError, match="speculative_config: method 'eagle' is not supported with enable_lora"):
        LLM(str(tiny_model_dirs["llama"]), dtype="float32", enable_lora=True, kv_cache_memory=16 << 20,
            speculative_config={"method": "eagle", "model": "unused", "num_speculative_tokens": 2})
