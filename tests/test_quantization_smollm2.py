"""The real default model: the SmolLM2 Q4_1 GGUF served from its 4-bit blocks as they are (the default), against a
bf16 copy of the same (dequantized) weights, and SmolLM2 quantized to int8 at load still answering."""

from __future__ import annotations

import gc

import pytest
import torch
from llmctl import LLM, SamplingParams

ENGINE = dict(dtype="bfloat16", max_model_len=512, kv_cache_memory=64 << 20, max_num_batched_tokens=512)
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The largest planet in our solar system is",
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_bf16_dir(tmp_path_factory, smollm2_gguf):
    """A safetensors checkpoint of the GGUF's weights dequantized (by gguf's dequantizer) to bf16."""
    from llmctl.loader.gguf_file import open_gguf
    from llmctl.loader.gguf_hf import iter_hf_tensors
    from llmctl.loader.source import resolve_model
    from llmctl.loader.tokenizer import load_tokenizer
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("smollm2-bf16")
    source = resolve_model(str(smollm2_gguf))
    source.hf_config.save_pretrained(out)
    load_tokenizer(source).save_pretrained(out)
    save_file({name: t.to(torch.bfloat16).contiguous() for name, t in iter_hf_tensors(open_gguf(smollm2_gguf))},
              str(out / "model.safetensors"))
    return out


def _greedy(llm: LLM, n: int = 16) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def _answer(llm: LLM) -> str:
    return llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0].text


pytestmark = pytest.mark.slow


def test_q4_1_as_is_agrees_with_its_bf16_copy(smollm2_gguf, smollm2_bf16_dir, monkeypatch):
    """The default (no quantization named) keeps the file's blocks and answers the README's question; the CPU
    plugin's opt-in int8 activations (llama.cpp's arithmetic) still complete the capital."""
    llm = LLM(str(smollm2_gguf), **ENGINE)
    summary = llm.llm_engine.core.model.quant_summary.describe()
    assert "Q4_1" in summary and summary.count("->") >= 1
    quantized = _greedy(llm)
    assert "Paris" in _answer(llm)
    del llm
    gc.collect()
    reference = _greedy(LLM(str(smollm2_bf16_dir), **ENGINE))
    same = sum(a == b for q, r in zip(quantized, reference, strict=True) for a, b in zip(q, r, strict=True))
    prefix = sum(next((i for i, (a, b) in enumerate(zip(q, r)) if a != b), len(q))
                 for q, r in zip(quantized, reference, strict=True))
    total = sum(len(r) for r in reference)
    print(f"\nSmolLM2 Q4_1 as is vs its bf16 copy: {same}/{total} greedy tokens equal position by position, "
          f"{prefix}/{total} before the first divergence")
    assert same >= 0.75 * total
    # The chat question's first token is a near-tie in this file (0.08 nats between "The" and "L'" with float
    # activations), which int8 activations tip the way llama.cpp's do: PROMPTS[0] completed must still name it.
    monkeypatch.setenv("LLMCTL_CPU_GGUF_INT8_ACT", "1")
    llm = LLM(str(smollm2_gguf), **ENGINE)
    act8 = llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in act8.outputs[0].text
    del llm
    gc.collect()


def test_int8_still_answers(smollm2_bf16_dir):
    llm = LLM(str(smollm2_bf16_dir), quantization="int8", **ENGINE)
    assert "int8 w8a16" in llm.llm_engine.core.model.quant_summary.describe()
    assert "Paris" in _answer(llm)
