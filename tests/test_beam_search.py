"""Beam search against transformers' generate(num_beams=..., do_sample=False) on a tiny fp32 Llama, with and
without EOS inside the beams and with length penalties; bad parameters refused naming the field; every KV
block free afterwards."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from llmctl import LLM, BeamSearchParams

from tests._engine_util import _single_thread, assert_all_blocks_free  # noqa: F401

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def hf_beams(model_dir, prompt_ids: list[int], width: int, max_new: int, length_penalty: float):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), num_beams=width, num_return_sequences=width,
                             do_sample=False, max_new_tokens=max_new, early_stopping=False,
                             length_penalty=length_penalty, output_scores=True, return_dict_in_generate=True,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    seqs = [[t for t in s.tolist()[len(prompt_ids):]] for s in out.sequences]
    return seqs, out.sequences_scores.tolist()


def strip_pad(ids: list[int], eos: int, pad: int) -> list[int]:
    """transformers pads finished beams to the longest one; cut after the first EOS."""
    if eos in ids:
        return ids[:ids.index(eos) + 1]
    return [t for t in ids if t != pad] if pad != eos else ids


@pytest.fixture(scope="module")
def eos_model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with its EOS moved to a token that ends some of its best beams, so beams finish early
    (and the search may stop before max_tokens)."""
    llm = LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, kv_cache_memory=32 << 20)
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    params = BeamSearchParams(beam_width=4, max_tokens=8)
    candidates = [t for s in llm.beam_search([ids], BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=True))[
        0].sequences for t in s.output_token_ids]
    eos = None
    for cand in dict.fromkeys(candidates):
        llm.llm_engine.input_processor.eos_token_ids = (cand,)
        if all(any(s.finish_reason == "stop" for s in llm.beam_search([ids], params.__class__(
                beam_width=w, max_tokens=8))[0].sequences) for w in (2, 4)):
            eos = cand
            break
    assert eos is not None, "no token of the beams ends a best beam"
    del llm
    d = tmp_path_factory.mktemp("eos") / "tiny-llama-eos"
    shutil.copytree(tiny_llama_dir, d)
    for name in ("config.json", "generation_config.json"):
        path = d / name
        if path.exists():
            cfg = json.loads(path.read_text())
            cfg["eos_token_id"] = eos
            path.write_text(json.dumps(cfg))
    return d, eos


@pytest.mark.parametrize("width, length_penalty", [(2, 1.0), (4, 1.0), (4, 0.5)])
def test_matches_transformers(tiny_llama_dir, width, length_penalty):
    llm = LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, kv_cache_memory=32 << 20)
    tok = llm.get_tokenizer()
    outs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=width, max_tokens=8, length_penalty=length_penalty))
    for prompt, out in zip(PROMPTS, outs):
        ids = tok.encode(prompt)
        hf_seqs, hf_scores = hf_beams(tiny_llama_dir, ids, width, 8, length_penalty)
        assert len(out.sequences) == width
        assert out.sequences[0].output_token_ids == hf_seqs[0]
        assert [s.output_token_ids for s in out.sequences] == hf_seqs
        mine = [s.cum_logprob / len(s.output_token_ids) ** length_penalty for s in out.sequences]
        assert mine == pytest.approx(hf_scores, abs=1e-4)
        assert out.sequences[0].tokens[:len(ids)] == ids and out.sequences[0].text.startswith(prompt[:5])
    assert_all_blocks_free(llm.get_stats())


@pytest.mark.parametrize("width", [2, 4])
def test_eos_inside_the_beams_matches_transformers(eos_model_dir, width):
    model_dir, eos = eos_model_dir
    llm = LLM(str(model_dir), dtype="float32", num_threads=1, kv_cache_memory=32 << 20)
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    out = llm.beam_search([{"prompt_token_ids": ids}], BeamSearchParams(beam_width=width, max_tokens=8))[0]
    hf_seqs, _ = hf_beams(model_dir, ids, width, 8, 1.0)
    pad = json.loads((model_dir / "config.json").read_text()).get("pad_token_id", eos)
    hf_seqs = [strip_pad(s, eos, pad) for s in hf_seqs]
    assert any(eos in s for s in hf_seqs), "EOS must end some beam for this test to mean something"
    assert [s.output_token_ids for s in out.sequences] == hf_seqs
    assert all((s.finish_reason == "stop") == (s.output_token_ids[-1] == eos) for s in out.sequences)
    assert_all_blocks_free(llm.get_stats())


@pytest.mark.parametrize("kw, field", [
    (dict(beam_width=0, max_tokens=4), "beam_width"),
    (dict(beam_width=11, max_tokens=4), "beam_width"),
    (dict(beam_width=2, max_tokens=0), "max_tokens"),
    (dict(beam_width=2, max_tokens=4, length_penalty=float("nan")), "length_penalty"),
    (dict(beam_width=2, max_tokens=4, temperature=0.7), "temperature"),
])
def test_bad_params_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        BeamSearchParams(**kw)


def test_prompt_too_long_for_max_tokens(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, kv_cache_memory=32 << 20, max_model_len=32)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.beam_search(["hello there"], BeamSearchParams(beam_width=2, max_tokens=40))
    assert_all_blocks_free(llm.get_stats())
