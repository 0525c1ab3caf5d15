"""LoRA with tensor parallelism: two ``mp`` ranks on gloo serve adapters split like their base layers (B's rows of
q/k/v and gate/up, A's columns of o_proj and down_proj, whose partial deltas join the all-reduce; the embedding's
and LM head's adapters whole, after the collective), mixed in one batch with the base model, on a model whose one
KV head is replicated on both ranks. Held to transformers with each adapter merged (fp32): greedy tokens equal,
logprobs close."""

from __future__ import annotations

import pytest
import torch

from tests.lora_support import make_adapter
from tests.model_factory import make_tiny_model

pytest.importorskip("peft")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42, 43, 44]]
MAX_TOKENS = 8
TOL = 2e-3
ADAPTERS = {  # name -> (rank, alpha, targets, rslora)
    "attn": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    "mlp": (4, 8, ["gate_proj", "up_proj", "down_proj"], True),
    "edges": (8, 8, ["embed_tokens", "lm_head", "v_proj", "down_proj"], False),
}


def _merged(base, adapter):
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def test_adapters_split_over_two_ranks_equal_merged_transformers(tmp_path, test_tokenizer):
    from llmctl import LLM, SamplingParams
    from llmctl.lora import LoRARequest

    base = make_tiny_model("llama", tmp_path / "llama", test_tokenizer, num_key_value_heads=1)
    paths = {name: make_adapter(base, tmp_path / name, *spec, seed=50 + i)
             for i, (name, spec) in enumerate(ADAPTERS.items())}
    loras = {name: LoRARequest(name, i + 1, str(p)) for i, (name, p) in enumerate(paths.items())}
    llm = LLM(str(base), dtype="float32", tensor_parallel_size=2, num_threads=1, seed=0, enable_lora=True,
              max_loras=2, max_lora_rank=8, kv_cache_memory=16 << 20)
    try:
        jobs = [(p, name) for p in PROMPTS for name in (*loras, None)]
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], params, use_tqdm=False,
                            lora_request=[None if n is None else loras[n] for _, n in jobs])
        with pytest.raises(ValueError, match="r: rank 16 is above max_lora_rank 8"):  # checked on the driver
            big = make_adapter(base, tmp_path / "big", 16, 16, ["q_proj"], False, seed=9)
            llm.generate([{"prompt_token_ids": PROMPTS[1]}], params, use_tqdm=False,
                         lora_request=LoRARequest("big", 9, str(big)))
        again = llm.generate([{"prompt_token_ids": PROMPTS[1]}], params, use_tqdm=False, lora_request=loras["attn"])
    finally:
        llm.llm_engine.shutdown()
    got = {(tuple(p), n): o.outputs[0] for (p, n), o in zip(jobs, outs, strict=True)}
    assert again[0].outputs[0].token_ids == got[(tuple(PROMPTS[1]), "attn")].token_ids  # the engine kept serving
    for name in (*loras, None):
        model = _merged(base, None if name is None else paths[name])
        for p in PROMPTS:
            comp = got[(tuple(p), name)]
            with torch.no_grad():
                want = model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                      do_sample=False, pad_token_id=0)[0].tolist()
                rows = model(torch.tensor([want])).logits[0].double().log_softmax(-1)
            assert comp.token_ids == want[len(p):], (name, p)
            for j, (tok, lp) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
                assert abs(lp[tok].logprob - float(rows[len(p) - 1 + j, tok])) < TOL, (name, p, j)
    for p in PROMPTS:
        assert len({tuple(got[(tuple(p), n)].token_ids) for n in (*loras, None)}) == 4  # every adapter matters
