"""BART through the engine: cross-attention K/V in the paged cache, compared with transformers in fp32.

Greedy runs use ``min_tokens == max_tokens`` on both sides (transformers' ``min_new_tokens``), so neither stops
early on EOS and every step is compared; logprobs are of the raw distribution, compared with transformers' raw
logits. A tiny random BART soon repeats a token whatever its initialisation (``init_std`` 0.6 gives the most
varied outputs of those tried); the per-step logprob comparison checks every position's distribution anyway.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch
from llmctl import LLM, AsyncLLM, EngineArgs, SamplingParams
from llmctl.engine.kv_sizing import profile_step
from llmctl_server import ServerSettings

from tests._engine_util import _single_thread, assert_all_blocks_free  # noqa: F401  (autouse fixture)
from tests.test_server_support import start_server, wait_kv_free

LONG = "The capital of France is a city that many people visit every single year, and most of them come back"
PROMPTS = ["Hello, my name is", LONG + " again and again for the food", "def fibonacci(n):", "1, 2, 3, 4,"]
MAX_NEW = 10
BLOCK = 16


def make_tiny_bart(out: Path, tok) -> Path:
    import transformers as tf

    torch.manual_seed(3)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else 1
    cfg = tf.BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=128, init_std=0.6, scale_embedding=True, bos_token_id=tok.bos_token_id,
                        eos_token_id=eos, pad_token_id=pad, decoder_start_token_id=eos, forced_eos_token_id=None,
                        forced_bos_token_id=None, architectures=["BartForConditionalGeneration"])
    model = tf.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a non-zero bias, so that the test covers it
        model.final_logits_bias.normal_(0, 0.1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bart_dir(model_cache_dir, test_tokenizer) -> Path:
    out = model_cache_dir / "bart"
    if not (out / "config.json").exists():
        make_tiny_bart(out, test_tokenizer)
    return out


@pytest.fixture(scope="module")
def hf_bart(bart_dir):
    import transformers as tf

    return tf.BartForConditionalGeneration.from_pretrained(bart_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(bart_dir):
    return LLM(str(bart_dir), dtype="float32", num_threads=1, block_size=BLOCK, kv_cache_memory=4 << 20, seed=0)


def reference(hf_bart, tok, prompt: str | list[int], n: int = MAX_NEW) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and raw log-softmax per step."""
    ids = torch.tensor([tok.encode(prompt) if isinstance(prompt, str) else prompt])
    with torch.no_grad():
        out = hf_bart.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, num_beams=1, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, 1:].tolist()
    return tokens, [torch.log_softmax(s[0].float(), -1) for s in out.logits]


def greedy(max_new: int = MAX_NEW, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_new, min_tokens=max_new, **kw)


def check_logprobs(completion, ref_lps: list[torch.Tensor]) -> None:
    assert completion.logprobs is not None and len(completion.logprobs) == len(ref_lps)
    for step, (mine, ref) in enumerate(zip(completion.logprobs, ref_lps, strict=True)):
        for token_id, lp in mine.items():
            assert abs(lp.logprob - ref[token_id].item()) < 1e-3, (step, token_id)


def test_bart_matches_transformers(llm, hf_bart, test_tokenizer):
    """One prompt at a time: greedy tokens equal transformers' generate, top-5 logprobs within 1e-3."""
    for prompt in PROMPTS:
        ref_tokens, ref_lps = reference(hf_bart, test_tokenizer, prompt)
        out = llm.generate(prompt, greedy(logprobs=5), use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == ref_tokens, prompt
        check_logprobs(out.outputs[0], ref_lps)
    assert_all_blocks_free(_stats(llm))


def test_bart_on_the_reference_backend(bart_dir, hf_bart, test_tokenizer):
    """The torch reference attention gives the transformers tokens too: the paged views are backend-neutral."""
    ref = LLM(str(bart_dir), dtype="float32", num_threads=1, block_size=BLOCK, kv_cache_memory=4 << 20,
              attention_backend="torch-reference")
    out = ref.generate(PROMPTS, greedy(logprobs=5), use_tqdm=False)
    for prompt, o in zip(PROMPTS, out, strict=True):
        tokens, lps = reference(hf_bart, test_tokenizer, prompt)
        assert list(o.outputs[0].token_ids) == tokens
        check_logprobs(o.outputs[0], lps)
    assert_all_blocks_free(_stats(ref))


def test_profiling_pass_runs_without_encoder_lengths(llm):
    """The start-up profiling step (run on accelerators) calls the model without ``encoder_lens``: the model
    reads each sequence as a maximal encoder plus decoder rows, within both position tables."""
    core = llm.llm_engine.core
    profile_step(core.model, core.attention, core.scheduler_config, core.args.block_size, core.kv_cache_dtype,
                 core.model.kv_cache_spec(), core.device, pooling=False,
                 limit_mm_per_prompt=core.args.limit_mm_per_prompt)()


def _stats(llm: LLM) -> dict:
    return llm.get_stats()


def test_batch_of_mixed_lengths(llm, hf_bart, test_tokenizer):
    """Encoders of different lengths (one over a block boundary) in one batch, each equal to its own reference."""
    refs = [reference(hf_bart, test_tokenizer, p)[0] for p in PROMPTS]
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == refs
    assert_all_blocks_free(_stats(llm))


def test_prefix_cache_reuses_cross_kv_only_for_the_same_encoder(llm, hf_bart, test_tokenizer):
    """A repeated encoder input hits its cached encoder blocks. An input that differs only by a trailing pad id
    has the same padded encoder blocks token for token, but other cross K/V (its encoder is one token longer): the
    encoder salt keeps it from hitting them, and it stays equal to transformers."""
    ids = test_tokenizer.encode(LONG)[:BLOCK - 1]
    pad = hf_bart.config.pad_token_id
    before = _stats(llm)["prefix_cache_hit_tokens"]
    first = llm.generate({"prompt_token_ids": ids}, greedy(), use_tqdm=False)[0]
    again = llm.generate({"prompt_token_ids": ids}, greedy(), use_tqdm=False)[0]
    hits = _stats(llm)["prefix_cache_hit_tokens"] - before
    assert hits == BLOCK and again.outputs[0].token_ids == first.outputs[0].token_ids
    other = llm.generate({"prompt_token_ids": ids + [pad]}, greedy(logprobs=5), use_tqdm=False)[0]
    assert _stats(llm)["prefix_cache_hit_tokens"] - before == hits  # no hit for another encoder input
    ref_tokens, ref_lps = reference(hf_bart, test_tokenizer, ids + [pad])
    assert list(other.outputs[0].token_ids) == ref_tokens
    check_logprobs(other.outputs[0], ref_lps)
    assert_all_blocks_free(_stats(llm))


def test_n_greater_than_one(llm, hf_bart, test_tokenizer):
    """Siblings reuse the first sibling's encoder blocks; greedy siblings all equal the reference."""
    ref = reference(hf_bart, test_tokenizer, PROMPTS[1])[0]
    out = llm.generate(PROMPTS[1], greedy(n=3), use_tqdm=False)[0]
    assert [list(c.token_ids) for c in out.outputs] == [ref] * 3
    sampled = llm.generate(PROMPTS[1], SamplingParams(temperature=1.0, max_tokens=MAX_NEW, n=3, seed=1),
                           use_tqdm=False)[0]
    assert len(sampled.outputs) == 3
    assert_all_blocks_free(_stats(llm))


def test_preemption_recomputes_encoder(bart_dir, hf_bart, test_tokenizer, monkeypatch):
    """A cache too small for every request at once and the smallest token budget (one padded encoder): preempted
    requests recompute their encoder and decoder tokens, encoders wait for a budget that holds them whole, and
    recomputed decoder tokens are chunked; all still equal transformers."""
    small = LLM(str(bart_dir), dtype="float32", num_threads=1, block_size=BLOCK, kv_cache_memory=_blocks(bart_dir, 20),
                max_model_len=160, max_num_batched_tokens=128)
    import llmctl.engine.scheduler as scheduler_mod
    import llmctl.models.bart as bart_mod

    waited, decoder_chunks = [], []
    real_ok, real_split = scheduler_mod.encoder_chunk_ok, bart_mod.split_step

    def spy_ok(req, cached, num_new):
        ok = real_ok(req, cached, num_new)
        waited.extend([] if ok else [req.request_id])
        return ok

    def spy_split(md, positions, encoder_lens, bs):
        for q, s, e in zip(md.query_lens_cpu, md.seq_lens_cpu, encoder_lens, strict=True):
            if q > 1 and s - q >= -(-e // bs) * bs:  # several decoder tokens computed without their encoder
                decoder_chunks.append(q)
        return real_split(md, positions, encoder_lens, bs)

    monkeypatch.setattr(scheduler_mod, "encoder_chunk_ok", spy_ok)
    monkeypatch.setattr(bart_mod, "split_step", spy_split)
    prompts = PROMPTS * 2
    n = 100  # a recomputed encoder plus 100 decoder tokens exceeds the budget, so its decoder is chunked
    refs = [reference(hf_bart, test_tokenizer, p, n)[0] for p in prompts]
    outs = small.generate(prompts, greedy(n), use_tqdm=False)
    assert _stats(small)["num_preemptions"] > 0, "the test must force preemption"
    assert [list(o.outputs[0].token_ids) for o in outs] == refs
    assert_all_blocks_free(_stats(small))
    assert waited and decoder_chunks, "the test must make an encoder wait and chunk a recomputed decoder"


def _blocks(bart_dir: Path, n: int) -> int:
    """Bytes of ``n`` KV blocks of the tiny BART (2 decoder layers, 4 heads of 8, fp32)."""
    return n * 2 * 2 * BLOCK * 4 * 8 * 4


def test_refusals(llm, bart_dir):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        llm.generate({"prompt_token_ids": [5] * 129}, SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="max_tokens: 129 exceeds the decoder's max_position_embeddings"):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=129), use_tqdm=False)
    # the longest encoder input and the most decoder tokens fit together (each side has its own positions)
    assert llm.llm_engine.model_config.max_model_len == 128 + 1 + 128
    out = llm.generate({"prompt_token_ids": [5] * 128}, SamplingParams(max_tokens=128, min_tokens=128),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 128
    with pytest.raises(ValueError, match="use_beam_search"):
        from llmctl.beam_search import BeamSearchParams

        llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=2, max_tokens=4))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(str(bart_dir), dtype="float32", num_threads=1, kv_cache_memory=4 << 20, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def server(bart_dir):
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(bart_dir), dtype="float32", block_size=BLOCK,
                                                  kv_cache_memory=4 << 20, seed=0,
                                                  platform_options={"num_threads": 1}))
    srv = start_server(engine, ServerSettings(served_model_names=["bart"]))
    yield srv
    srv.stop()
    engine.shutdown()


def test_completions_through_openai_client(server, hf_bart, test_tokenizer):
    client = openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=60)
    for prompt in PROMPTS[:2]:
        ref_tokens, _ = reference(hf_bart, test_tokenizer, prompt)
        resp = client.completions.create(model="bart", prompt=prompt, max_tokens=MAX_NEW, temperature=0.0,
                                         extra_body={"min_tokens": MAX_NEW, "skip_special_tokens": False})
        assert resp.choices[0].text == test_tokenizer.decode(ref_tokens, skip_special_tokens=False)
        assert resp.usage.completion_tokens == MAX_NEW
        assert resp.usage.prompt_tokens == len(test_tokenizer.encode(prompt))  # the encoder input, not padding
        stream = client.completions.create(model="bart", prompt=prompt, max_tokens=MAX_NEW, temperature=0.0,
                                           stream=True, extra_body={"min_tokens": MAX_NEW,
                                                                    "skip_special_tokens": False})
        assert "".join(c.choices[0].text for c in stream) == resp.choices[0].text
    wait_kv_free(server.engine)
