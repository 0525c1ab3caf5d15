"""EAGLE-3 proposer: random-weight heads in the published layout over tiny Llamas. The head's first-step logits
equal a plain-torch re-implementation of its formulas, greedy output with speculation is token-identical to the
target alone (a smaller draft vocabulary with d2t offsets, the default auxiliary layers, a head with its own
embedding), the acceptance counters are reported, and heads that do not fit the target are refused by name."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from llmctl import SamplingParams
from safetensors.torch import load_file, save_file

from tests._engine_util import assert_all_blocks_free
from tests.model_factory import make_eagle3_head, make_tiny_model
from tests.test_spec_decode import COPY_PROMPTS, make_llm

K = 3


@pytest.fixture(scope="module")
def deep_llama_dir(model_cache_dir, test_tokenizer):
    """Eight layers, so that the default auxiliary layers (2, 4, 5) are three distinct layers."""
    return make_tiny_model("llama", model_cache_dir / "llama-8-layers", test_tokenizer, num_hidden_layers=8)


@pytest.fixture(scope="module")
def small_vocab_head(deep_llama_dir, model_cache_dir):
    return make_eagle3_head(deep_llama_dir, model_cache_dir / "eagle3-small-vocab", draft_vocab_size=200)


def _spec(head_dir, k=K):
    return {"method": "eagle3", "model": str(head_dir), "num_speculative_tokens": k}


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's rotate-half RoPE on [T, heads, d]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    half = d // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _head_prenorm(w: dict, cfg: dict, e: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """The head's layer over a whole sequence (causal, positions 0..T-1): its output before the final norm."""
    eps = cfg["rms_norm_eps"]
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // heads
    m = "midlayer."
    t = e.shape[0]
    x = torch.cat([_rms(e, w[m + "input_layernorm.weight"], eps), _rms(feat, w[m + "hidden_norm.weight"], eps)], -1)
    pos = torch.arange(t)
    q = _rope((x @ w[m + "self_attn.q_proj.weight"].T).view(t, heads, hd), pos, theta)
    k = _rope((x @ w[m + "self_attn.k_proj.weight"].T).view(t, kv_heads, hd), pos, theta)
    v = (x @ w[m + "self_attn.v_proj.weight"].T).view(t, kv_heads, hd)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, heads * hd)
    h = attn @ w[m + "self_attn.o_proj.weight"].T + feat  # the residual is the un-normed feature
    y = _rms(h, w[m + "post_attention_layernorm.weight"], eps)
    y = (torch.nn.functional.silu(y @ w[m + "mlp.gate_proj.weight"].T) * (y @ w[m + "mlp.up_proj.weight"].T)) \
        @ w[m + "mlp.down_proj.weight"].T
    return y + h


def _target_logits(w: dict, cfg: dict, prenorm: torch.Tensor) -> torch.Tensor:
    draft = _rms(prenorm, w["norm.weight"], cfg["rms_norm_eps"]) @ w["lm_head.weight"].T
    out = torch.full((cfg["vocab_size"],), float("-inf"))
    out[torch.arange(draft.shape[0]) + w["d2t"]] = draft
    return out


def _reference(target_dir, head_dir, token_ids: list[int], aux: tuple[int, ...], k: int,
               lm_head: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
    """The head's first-step logits (over the target's vocabulary) and its ``k`` greedy drafts, from the EAGLE-3
    formulas: features are the target's residual streams entering the aux layers (transformers'
    ``hidden_states[i]``) fused by fc; each further draft feeds back the head's pre-norm output as the feature."""
    import transformers as tf

    target = tf.AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    cfg = json.loads((head_dir / "config.json").read_text())
    w = load_file(str(head_dir / "model.safetensors"))
    if lm_head is not None:
        w["lm_head.weight"] = lm_head
    embed = w["embed_tokens.weight"] if "embed_tokens.weight" in w else target.get_input_embeddings().weight
    with torch.no_grad():
        states = target(torch.tensor([token_ids[:-1]]), output_hidden_states=True).hidden_states
        feats = torch.cat([states[i][0] for i in aux], -1) @ w["fc.weight"].T
        tokens = list(token_ids[1:])
        first, drafts = None, []
        for _ in range(k):
            last = _head_prenorm(w, cfg, embed[torch.tensor(tokens)], feats)[-1]
            logits = _target_logits(w, cfg, last)
            first = logits if first is None else first
            drafts.append(int(logits.argmax()))
            tokens.append(drafts[-1])
            feats = torch.cat([feats, last[None]])
        return first, drafts


@pytest.mark.parametrize("variant", ["default_layers_small_vocab", "explicit_layers_own_embedding"])
def test_logits_and_drafts_match_the_formulas(tiny_llama_dir, deep_llama_dir, small_vocab_head, model_cache_dir,
                                              variant):
    if variant == "default_layers_small_vocab":
        target, head, aux = deep_llama_dir, small_vocab_head, (2, 4, 5)
    else:
        target, aux = tiny_llama_dir, (1, 0, 1)  # any order, the embedding output included
        head = make_eagle3_head(tiny_llama_dir, model_cache_dir / "eagle3-own-embed", aux_layers=list(aux),
                                own_embedding=True)
    llm = make_llm(target, _spec(head, K))
    engine = llm.llm_engine
    prompt = llm.get_tokenizer().encode("one two three four five six seven", add_special_tokens=False)
    engine.add_request("e", {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=16,
                                                                        ignore_eos=True))
    proposer = engine.core.speculator.draft
    for step in range(3):  # the prefill, then verification steps (rejected drafts roll the head's cache back)
        engine.step()
        req = engine.core.scheduler.requests["e"]
        got = proposer.head.compute_logits(proposer._state["e"].next_feature)[0].float()
        expected, drafts = _reference(target, head, list(req.all_token_ids), aux, K)
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(got), finite)
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-4, atol=1e-4)
        assert req.spec_token_ids == drafts, step
    engine.abort_request(["e"])
    assert_all_blocks_free(engine.get_stats())


def test_eagle3_greedy_identical(deep_llama_dir, small_vocab_head):
    plain = make_llm(deep_llama_dir)
    spec = make_llm(deep_llama_dir, _spec(small_vocab_head), blocks=14, max_num_batched_tokens=64)
    prompts = COPY_PROMPTS + COPY_PROMPTS[:1]  # the repeat hits the prefix cache
    for sp in (SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
               SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2)):
        ref = plain.generate(prompts, sp, use_tqdm=False)
        got = spec.generate(prompts, sp, use_tqdm=False)
        for r, g in zip(ref, got):
            assert [o.token_ids for o in g.outputs] == [o.token_ids for o in r.outputs]
    stats = spec.get_stats()
    assert stats["num_preemptions"] > 0, "the cache must be tight enough to preempt"
    assert stats["spec_num_draft_tokens"] > 0 and 0.0 <= stats["spec_acceptance_rate"] <= 1.0
    assert stats["spec_mean_tokens_per_step"] >= 1.0
    assert_all_blocks_free(stats)


@pytest.mark.parametrize("shared_lm_head", [False, True])
def test_eagle3_full_vocab_greedy_identical(tiny_llama_dir, model_cache_dir, shared_lm_head):
    """draft_vocab_size == vocab_size; without lm_head.weight the head uses the target's LM head."""
    head = make_eagle3_head(tiny_llama_dir, model_cache_dir / "eagle3-full", seed=3, aux_layers=[1, 0, 1])
    if shared_lm_head:
        head = _broken(head, model_cache_dir / "eagle3-shared-lm-head", drop=("lm_head.weight",))
    sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    ref = make_llm(tiny_llama_dir).generate(COPY_PROMPTS, sp, use_tqdm=False)
    spec = make_llm(tiny_llama_dir, _spec(head, 4))
    got = spec.generate(COPY_PROMPTS, sp, use_tqdm=False)
    assert [g.outputs[0].token_ids for g in got] == [r.outputs[0].token_ids for r in ref]
    assert spec.get_stats()["spec_num_draft_tokens"] > 0
    engine = spec.llm_engine
    prompt = spec.get_tokenizer().encode("one two three", add_special_tokens=False)
    engine.add_request("f", {"prompt_token_ids": prompt}, sp)
    engine.step()
    proposer = engine.core.speculator.draft
    got_logits = proposer.head.compute_logits(proposer._state["f"].next_feature)[0].float()
    lm_head = load_file(str(tiny_llama_dir / "model.safetensors"))["lm_head.weight"] if shared_lm_head else None
    expected, _ = _reference(tiny_llama_dir, head, list(engine.core.scheduler.requests["f"].all_token_ids),
                             (1, 0, 1), 1, lm_head=lm_head)
    torch.testing.assert_close(got_logits, expected, rtol=1e-4, atol=1e-4)
    engine.abort_request(["f"])


def _broken(src, dst, drop=(), replace=None, config=None):
    """A copy of the head in ``src`` with tensors dropped or replaced, or config keys overridden."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    tensors = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if k not in drop}
    tensors.update(replace or {})
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_eagle3_head_must_fit_the_target(deep_llama_dir, tiny_llama_dir, small_vocab_head, model_cache_dir):
    root = model_cache_dir / "eagle3-bad"
    bad = _broken(small_vocab_head, root / "fc", replace={"fc.weight": torch.zeros(64, 128)})
    with pytest.raises(ValueError, match=r"speculative_config\.model: tensor fc\.weight has shape \[64, 128\]"):
        make_llm(deep_llama_dir, _spec(bad))
    bad = _broken(small_vocab_head, root / "qkv", replace={"midlayer.self_attn.k_proj.weight": torch.zeros(32, 64)})
    with pytest.raises(ValueError, match=r"tensor midlayer\.self_attn\.k_proj\.weight has shape"):
        make_llm(deep_llama_dir, _spec(bad))
    bad = _broken(small_vocab_head, root / "d2t", drop=("d2t",))
    with pytest.raises(ValueError, match=r"speculative_config\.model: .*lacks tensor d2t"):
        make_llm(deep_llama_dir, _spec(bad))
    bad = _broken(small_vocab_head, root / "d2t-range", replace={"d2t": torch.full((200,), 10**6)})
    with pytest.raises(ValueError, match=r"tensor d2t maps draft ids outside the target's vocabulary"):
        make_llm(deep_llama_dir, _spec(bad))
    bad = _broken(small_vocab_head, root / "d2t-shape", replace={"d2t": torch.zeros(199, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"tensor d2t has shape \[199\], expected \[200\]"):
        make_llm(deep_llama_dir, _spec(bad))
    bad = _broken(small_vocab_head, root / "lm_head", drop=("lm_head.weight",))
    with pytest.raises(ValueError, match=r"speculative_config\.model: .*lacks tensor lm_head\.weight"):
        make_llm(deep_llama_dir, _spec(bad))
    bad = _broken(small_vocab_head, root / "wide", config={"hidden_size": 96})
    with pytest.raises(ValueError, match=r"speculative_config\.model: the EAGLE-3 head's hidden_size \(96\)"):
        make_llm(deep_llama_dir, _spec(bad))
    bad = _broken(small_vocab_head, root / "layers", config={"eagle_aux_hidden_state_layer_ids": [2, 4, 8]})
    with pytest.raises(ValueError, match=r"speculative_config\.model: .*layers \[2, 4, 8\]"):
        make_llm(deep_llama_dir, _spec(bad))
    with pytest.raises(ValueError, match=r"speculative_config\.model: .*layers \[2, 1, -1\]"):
        make_llm(tiny_llama_dir, _spec(small_vocab_head))  # two layers: the default layers do not exist
    with pytest.raises(ValueError, match=r"speculative_config\.model"):
        make_llm(deep_llama_dir, _spec(deep_llama_dir))  # a whole model is not a head


def test_accepted_drafts_feed_the_head(deep_llama_dir, small_vocab_head):
    """A random head's drafts are never accepted, so the drafts are replaced by the target's own continuation
    (the last of each step wrong): verification then accepts several positions at once, whose auxiliary states
    the head must ingest row for row. Its logits after each step still equal the reference, the output equals
    the target's alone, and the acceptance counters see the accepted drafts."""
    prompt_text = "one two three four five six seven"
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    plain = make_llm(deep_llama_dir)
    prompt = plain.get_tokenizer().encode(prompt_text, add_special_tokens=False)
    expected = list(plain.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0].outputs[0].token_ids)
    llm = make_llm(deep_llama_dir, _spec(small_vocab_head))
    core = llm.llm_engine.core
    speculator = core.speculator
    vocab = core.model_config.vocab_size
    propose = speculator.propose

    def oracle(running):
        propose(running)
        for req in running:
            if req.spec_token_ids:
                done = req.num_output_tokens
                truth = expected[done:done + len(req.spec_token_ids)]
                req.spec_token_ids = truth[:-1] + [(truth[-1] + 1) % vocab] if len(truth) > 1 else truth

    speculator.propose = oracle
    llm.llm_engine.add_request("o", {"prompt_token_ids": prompt}, sp)
    checked = 0
    while "o" in core.scheduler.requests and not core.scheduler.requests["o"].finished:
        llm.llm_engine.step()
        req = core.scheduler.requests.get("o")
        state = speculator.draft._state.get("o")
        if req is None or req.finished or state is None or state.next_feature is None:
            break
        got = speculator.draft.head.compute_logits(state.next_feature)[0].float()
        ref, _ = _reference(deep_llama_dir, small_vocab_head, list(req.all_token_ids), (2, 4, 5), 1)
        finite = torch.isfinite(ref)
        torch.testing.assert_close(got[finite], ref[finite], rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked >= 3
    stats = llm.get_stats()
    assert stats["spec_num_accepted_tokens"] > 0 and stats["spec_acceptance_rate"] > 0.0
    assert stats["spec_mean_tokens_per_step"] > 1.0
    llm.llm_engine.abort_request(["o"])
    out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert list(out) == expected
    assert_all_blocks_free(llm.get_stats())


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_eagle3_on_qwen_targets(tiny_model_dirs, model_cache_dir, kind):
    """Heads for Qwen targets carry the target's model_type; the head is a plain Llama layer all the same (no
    q/k norm, no q/k/v bias), and the target's residual streams are taken the same way."""
    head = make_eagle3_head(tiny_model_dirs[kind], model_cache_dir / f"eagle3-{kind}", draft_vocab_size=300,
                            aux_layers=[0, 1, 1])
    assert json.loads((head / "config.json").read_text())["model_type"] == kind
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ref = make_llm(tiny_model_dirs[kind]).generate(COPY_PROMPTS, sp, use_tqdm=False)
    spec = make_llm(tiny_model_dirs[kind], _spec(head))
    got = spec.generate(COPY_PROMPTS, sp, use_tqdm=False)
    assert [g.outputs[0].token_ids for g in got] == [r.outputs[0].token_ids for r in ref]
    assert spec.get_stats()["spec_num_draft_tokens"] > 0
    assert_all_blocks_free(spec.get_stats())


def test_eagle3_refuses_lora(deep_llama_dir, small_vocab_head):
    with pytest.raises(ValueError, match="speculative_config: method 'eagle3' is not supported with enable_lora"):
        make_llm(deep_llama_dir, _spec(small_vocab_head), enable_lora=True)
