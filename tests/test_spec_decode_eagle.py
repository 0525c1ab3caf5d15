"""EAGLE proposer: a random-weight EAGLE-1 head over the tiny Llama. Its drafts equal a reference computed with
transformers (the target's final hidden states, the head's layer run over the whole sequence), greedy output
with speculation is token-identical to the target alone (preemption, n > 1, prefix-cache hits included), and the
acceptance counters are reported."""

from __future__ import annotations

import pytest
import torch
from llmctl import SamplingParams
from safetensors.torch import load_file

from tests._engine_util import assert_all_blocks_free
from tests.model_factory import make_eagle_head
from tests.test_spec_decode import COPY_PROMPTS, make_llm

K = 3


@pytest.fixture(scope="module")
def eagle_dir(tiny_llama_dir, model_cache_dir):
    return make_eagle_head(tiny_llama_dir, model_cache_dir / "eagle-head")


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


def _spec(eagle_dir, k=K):
    return {"method": "eagle", "model": str(eagle_dir), "num_speculative_tokens": k}


def _reference_drafts(tiny_llama_dir, eagle_dir, token_ids: list[int], k: int) -> list[int]:
    """EAGLE-1 by hand on transformers modules: features are the target's final hidden states, the head's layer
    (no input norm) runs over the whole shifted sequence each time, drafts are argmaxes of the target's LM head."""
    import transformers as tf

    target = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    cfg = tf.AutoConfig.from_pretrained(eagle_dir)
    head = tf.LlamaForCausalLM(cfg).eval()
    weights = load_file(str(eagle_dir / "model.safetensors"))
    layer = head.model.layers[0]
    layer.load_state_dict({k.removeprefix("layers.0."): v for k, v in weights.items() if k.startswith("layers.0.")},
                          strict=False)
    layer.input_layernorm = torch.nn.Identity()
    fc = torch.nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias="fc.bias" in weights)
    fc.weight.data.copy_(weights["fc.weight"])
    if "fc.bias" in weights:
        fc.bias.data.copy_(weights["fc.bias"])
    rotary = head.model.rotary_emb
    embed = target.get_input_embeddings()
    with torch.no_grad():
        ids = torch.tensor([token_ids[:-1]])
        feats = target(ids, output_hidden_states=True).hidden_states[-1][0]  # after the final norm
        tokens = list(token_ids[1:])
        drafts: list[int] = []
        for _ in range(k):
            n = len(tokens)
            x = fc(torch.cat([embed(torch.tensor([tokens]))[0], feats[:n]], dim=-1))[None]
            pos = torch.arange(n)[None]
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rotary(x, pos))
            out = out[0] if isinstance(out, tuple) else out
            last = out[0, -1]
            d = int(target.lm_head(last).argmax())
            drafts.append(d)
            tokens.append(d)
            feats = torch.cat([feats[:n], last[None]])
        return drafts


def test_drafts_match_a_transformers_reference(tiny_llama_dir, eagle_dir):
    llm = make_llm(tiny_llama_dir, _spec(eagle_dir, 4))
    engine = llm.llm_engine
    prompt = llm.get_tokenizer().encode("one two three four five six seven", add_special_tokens=False)
    engine.add_request("e", {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=32,
                                                                        ignore_eos=True))
    for step in range(3):
        engine.step()
        req = engine.core.scheduler.requests["e"]
        expected = _reference_drafts(tiny_llama_dir, eagle_dir, list(req.all_token_ids), 4)
        assert req.spec_token_ids == expected, step
    engine.abort_request(["e"])
    assert_all_blocks_free(engine.get_stats())


@pytest.mark.parametrize("fc_bias", [True, False])
def test_eagle_greedy_identical(tiny_llama_dir, model_cache_dir, plain, fc_bias):
    head = make_eagle_head(tiny_llama_dir, model_cache_dir / f"eagle-bias{fc_bias}", seed=5, fc_bias=fc_bias)
    spec = make_llm(tiny_llama_dir, _spec(head), blocks=14, max_num_batched_tokens=64)
    prompts = COPY_PROMPTS + COPY_PROMPTS[:1]  # the repeat hits the prefix cache
    for sp in (SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
               SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2)):
        ref = plain.generate(prompts, sp, use_tqdm=False)
        got = spec.generate(prompts, sp, use_tqdm=False)
        for r, g in zip(ref, got):
            assert [o.token_ids for o in g.outputs] == [o.token_ids for o in r.outputs]
    stats = spec.get_stats()
    assert stats["num_preemptions"] > 0, "the cache must be tight enough to preempt"
    assert stats["spec_num_draft_tokens"] > 0 and "spec_acceptance_rate" in stats
    assert stats["spec_mean_tokens_per_step"] >= 1.0
    assert_all_blocks_free(stats)


def test_eagle_head_must_fit_the_target(tiny_model_dirs, model_cache_dir, eagle_dir):
    with pytest.raises(ValueError, match=r"speculative_config\.model: the EAGLE head's hidden size"):
        import json

        bad = model_cache_dir / "eagle-wide"
        bad.mkdir(exist_ok=True)
        cfg = json.loads((eagle_dir / "config.json").read_text())
        cfg["hidden_size"] = 96
        (bad / "config.json").write_text(json.dumps(cfg))
        (bad / "model.safetensors").write_bytes((eagle_dir / "model.safetensors").read_bytes())
        make_llm(tiny_model_dirs["llama"], _spec(bad))
    with pytest.raises(ValueError, match=r"speculative_config\.model"):
        make_llm(tiny_model_dirs["llama"], _spec(tiny_model_dirs["llama"]))  # a whole model is not a head
